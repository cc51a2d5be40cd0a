"""The drafter's acceptance curve, per-prompt best block sizes, and its model card.

Speed is projected from counts (target forwards) times a step-cost table measured once on the
machine, because wall-clock on a shared 2-core machine is noise; measured tokens/s come from
`blockpilot bench` side by side in one run.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path

from blockpilot.policy_export.collect import per_prompt_scores

from .. import assets
from ..draft_vocab import FILE_NAME as DRAFT_VOCAB_FILE, DraftVocabulary
from ..step_cost import step_ms

DOCS = Path(__file__).resolve().parents[2] / "docs"


def totals_by_size(rows: list[dict]) -> defaultdict:
    """{block size: [tokens committed after the first, target forwards]} over replayed or run rows; their
    ratio is the acceptance length. A size with no rows reads [0, 0]."""
    by_size = defaultdict(lambda: [0, 0])
    for row in rows:
        by_size[row["block_size"]][0] += row["generated_tokens"] - 1
        by_size[row["block_size"]][1] += row["target_forwards"]
    return by_size


def summarise_curve(rows: list[dict], costs: dict) -> dict:
    by_size = totals_by_size(rows)
    per_prompt = per_prompt_scores(rows, costs)
    plain_rate = by_size[1][0] / (by_size[1][1] * step_ms(costs, 1)) if by_size[1][1] else None
    curve = []
    for size in sorted(by_size):
        tokens, forwards = by_size[size]
        rate = tokens / (forwards * step_ms(costs, size)) if forwards else 0.0
        curve.append({"block_size": size, "acceptance_length": round(tokens / forwards, 4) if forwards else 0.0,
                      "step_ms": round(step_ms(costs, size), 2), "projected_tokens_per_s": round(rate * 1e3, 2),
                      "projected_speedup": round(rate / plain_rate, 3) if plain_rate else None})
    drafted = [c for c in curve if c["block_size"] > 1]
    best_by_acceptance = Counter(max((s for s in p if s > 1), key=lambda s: (p[s][0], -s)) for p in per_prompt.values()
                                 if any(s > 1 for s in p))
    best_by_speed = Counter(max(p, key=lambda s: (p[s][1], -s)) for p in per_prompt.values())
    oracle_acceptance = [max(v[0] for s, v in p.items() if s > 1) for p in per_prompt.values() if any(s > 1 for s in p)]
    return {
        "prompts": len(per_prompt),
        "curve": curve,
        "position_accuracy": position_accuracy(rows, POSITION_ACCURACY_SIZE),
        "best_fixed_by_acceptance": max(drafted, key=lambda c: c["acceptance_length"])["block_size"] if drafted else None,
        "best_fixed_by_projected_speed": max(curve, key=lambda c: c["projected_tokens_per_s"])["block_size"],
        "per_prompt_best_by_acceptance": dict(sorted(best_by_acceptance.items())),
        "per_prompt_best_by_projected_speed": dict(sorted(best_by_speed.items())),
        "oracle_mean_acceptance": round(sum(oracle_acceptance) / len(oracle_acceptance), 4) if oracle_acceptance else None,
        "step_costs": costs,
    }


def summarise_sampled(temperature: float, rows: list[dict], costs: dict) -> dict:
    """The acceptance curve replayed on the target's answers sampled at `temperature`."""
    full = summarise_curve(rows, costs)
    return {"temperature": temperature, "prompts": full["prompts"],
            "acceptance_length": {c["block_size"]: c["acceptance_length"] for c in full["curve"]},
            "position_accuracy": full["position_accuracy"],
            "best_fixed_by_acceptance": full["best_fixed_by_acceptance"],
            "oracle_mean_acceptance": full["oracle_mean_acceptance"]}


POSITION_ACCURACY_SIZE = 4  # the block size whose per-position accuracy the card reports (sizes that can pay here)


def position_accuracy(rows: list[dict], block_size: int) -> dict | None:
    """Per draft position k at `block_size`, from the replayed steps: `reached` = P(the first k drafts
    all accepted), `given_previous` = P(draft k accepted | drafts 1..k-1 were)."""
    steps = [a for row in rows if row["block_size"] == block_size for a in row.get("accepted_per_step") or []]
    if not steps:
        return None
    result, previous = {}, len(steps)
    for k in range(1, block_size):
        reached = sum(1 for a in steps if a >= k)
        result[k] = {"reached": round(reached / len(steps), 4),
                     "given_previous": round(reached / previous, 4) if previous else None}
        previous = reached
    return {"block_size": block_size, "steps": len(steps), "positions": result}


def plot_curve(summary: dict, png_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = [c for c in summary["curve"]]
    sizes = [c["block_size"] for c in curve]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].plot(sizes, [c["acceptance_length"] for c in curve], "o-", label="greedy")
    sampled = summary.get("sampled")
    if sampled:  # JSON keys come back as strings
        accepted = {int(k): v for k, v in sampled["acceptance_length"].items()}
        axes[0].plot(sizes, [accepted[s] for s in sizes], "s--", label=f"temperature {sampled['temperature']:g}")
        axes[0].legend()
    axes[0].set(xlabel="block size", ylabel="tokens per target forward", title="Acceptance length (MT-Bench)")
    axes[1].plot(sizes, [c["projected_speedup"] for c in curve], "o-", color="tab:green")
    axes[1].axhline(1.0, color="grey", ls="--", lw=0.8)
    axes[1].set(xlabel="block size", ylabel="x plain decoding", title="Projected decode speed-up (counts x step costs)")
    for key, label in (("per_prompt_best_by_acceptance", "by acceptance"), ("per_prompt_best_by_projected_speed", "by speed")):
        best = summary[key]
        axes[2].bar([int(k) + (0.2 if "speed" in key else -0.2) for k in best], list(best.values()), width=0.4, label=label)
    axes[2].set(xlabel="block size", ylabel="prompts", title="Per-prompt best block size")
    axes[2].legend()
    fig.tight_layout()
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=110)
    plt.close(fig)


def format_counts(counts: dict) -> str:
    """`{size: prompts}` as "2: 46, 3: 18", sizes in numeric order (JSON turns the keys into strings)."""
    return ", ".join(f"{k}: {v}" for k, v in sorted(counts.items(), key=lambda kv: int(kv[0])))


def write_model_card(recipe, summary: dict) -> None:
    out = Path(recipe.output_dir)
    training = json.loads((out / "training_summary.json").read_text()) if (out / "training_summary.json").exists() else {}
    span = training.get("store_shards", "")
    shards = f" (this run: the store's shards {span})" if span and not span.startswith("0-") else ""
    config = json.loads((out / "config.json").read_text())
    layer_ids = config["dflash_config"]["target_layer_ids"]
    # The shipped drafter's curve goes into the docs; a candidate's stays beside it.
    shipped = out.resolve() == assets.DEFAULT_DRAFTER_DIR.resolve()
    png = DOCS / "drafter-acceptance.png" if shipped else out / "drafter-acceptance.png"
    plot_curve(summary, png)
    image = "../../../docs/drafter-acceptance.png" if shipped else "drafter-acceptance.png"
    sampled = summary.get("sampled")
    vocabulary_file = out / DRAFT_VOCAB_FILE
    vocabulary = (f"Drafts come from {len(DraftVocabulary.load(vocabulary_file, int(config['vocab_size']))):,} frequent tokens "
                  f"(`{DRAFT_VOCAB_FILE}`: the draft's lm_head over those rows only; runtime/draft_vocab.py), as "
                  f"measured below; the target still verifies over every token."
                  if vocabulary_file.is_file() else "Drafts come from the whole vocabulary.")

    def at_temperature(size) -> str:  # JSON keys come back as strings
        return f" {sampled['acceptance_length'].get(size, sampled['acceptance_length'].get(str(size))):.2f} |" if sampled else ""

    rows = "\n".join(f"| {c['block_size']} | {c['acceptance_length']:.2f} |{at_temperature(c['block_size'])} "
                     f"{c['step_ms']:.1f} | {c['projected_tokens_per_s']:.1f} | {c['projected_speedup']:.2f} |"
                     for c in summary["curve"])
    sampled_header = f" at temperature {sampled['temperature']:g} |" if sampled else ""
    sampled_lines = (f"Acceptance at temperature {sampled['temperature']:g}: replayed on the target's answers sampled "
                     f"at that temperature (seeded per prompt), with sampled drafts: a draft survives given the "
                     f"output token x with min(1, q(x) / p(x)), the engine's counts in distribution (runtime/replay.py). "
                     f"Best fixed size there: "
                     f"{sampled['best_fixed_by_acceptance']}; per-prompt oracle: {sampled['oracle_mean_acceptance']}.\n"
                     + _position_lines(sampled.get("position_accuracy")) if sampled else "")
    costs = summary["step_costs"]
    pinned = (f"the recipe pins their digest (`data.prompt_set_sha256: {recipe.data.prompt_set_sha256}`) and a "
              "rebuild checks it." if recipe.data.prompt_set_sha256 else
              "this recipe pins no digest (its data stage ran under another Python; see the notes).")
    card = f"""# DFlash drafter for SmolLM2-135M-Instruct (BlockPilot)

A {recipe.drafter.num_layers}-layer DFlash block-diffusion drafter trained by this project's recipe
(`blockpilot train-drafter --config {recipe.source or 'RECIPE.yaml'}`) for the embedded default target.
Format: the published z-lab layout (`DFlashDraftModel`), block size {recipe.drafter.block_size},
context from target layers {layer_ids};
mask token `<empty_output>` (id 16).
{vocabulary}

## Training
- Data: the target's own greedy responses (up to {recipe.data.max_new_tokens} new tokens, in float32 or
  bfloat16: `data.cpu_dtype` on a CPU, `data.device_dtype` on a GPU) to
  {training.get('sequences', '?')} training prompts{shards} built offline from the Python standard library
  (code writing/explaining, language topics, documentation paragraphs), hand-written chat requests,
  templated assistant tasks (writing, role-play, reasoning, maths, extraction, science/humanities),
  questions and instructions the target wrote itself (`data.self_questions`, `data.instructions`)
  and second turns on them;
  {training.get('response_tokens', '?')} response tokens. MT-Bench is never used for training.
  The standard-library prompts depend on the Python version that builds them: {pinned}
- Steps: {training.get('steps', '?')} (of this run; see the notes for what it continued), wall time
  {training.get('wall_time_s', '?')} s on {training.get('hardware', 'a 2-core x86-64 CPU (no GPU)')}; final loss {training.get('final_loss', '?')}; held-out acceptance (validation prompts of
  the training distribution, block size {recipe.drafter.block_size}): {training.get('val_replayed_acceptance_length', '?')}
  replaying greedy decoding (the runtime's figure), {training.get('val_acceptance_length', '?')} from random
  anchor points (optimistic: a decoding step starts right after the drafter's last miss).

## How this recipe was chosen
{recipe.notes.strip() or "(no notes in the recipe)"}

## Acceptance curve (held out: {summary['prompts']} MT-Bench first turns, greedy, {recipe.eval.max_new_tokens} new tokens)
Step costs measured on this machine ({costs['dtype']}, {costs['threads']} threads, KV cache of
{costs['context_tokens']} tokens); projected speed = tokens / (target forwards x step cost).

| block size | acceptance length |{sampled_header} step ms | projected tok/s | x plain |
|---|---|{'---|' if sampled else ''}---|---|---|
{rows}

{_position_lines(summary.get('position_accuracy'))}{sampled_lines}
Best fixed size by acceptance: {summary['best_fixed_by_acceptance']}; by projected speed:
{summary['best_fixed_by_projected_speed']}. Per-prompt oracle mean acceptance (sizes 2..24):
{summary['oracle_mean_acceptance']}. Per-prompt best size (by acceptance):
{format_counts(summary['per_prompt_best_by_acceptance'])}; (by projected speed): {format_counts(summary['per_prompt_best_by_projected_speed'])}.

![curve]({image})
"""
    (out / "README.md").write_text(card)


def _position_lines(accuracy: dict | None) -> str:
    if not accuracy:
        return ""
    parts = ", ".join(f"position {k}: {v['reached']:.3f} ({v['given_previous']:.3f} given the drafts before it)"
                      for k, v in accuracy["positions"].items())
    return f"Draft accuracy at block size {accuracy['block_size']} ({accuracy['steps']} replayed steps): {parts}.\n"
