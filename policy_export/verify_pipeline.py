"""The per-step verify rule's two pipeline stages, driven by the policy recipe's `verify` section:

    blockpilot calibrate-verify --config R   # fit the drafter's confidence on held-apart prompts
    blockpilot eval-verify      --config R   # held out: fixed sizes x {full verify, rule}, policy + rule,
                                             # random + rule, per-step oracle; JSON + table + PNG

Calibration prompts are the policy part's prompts after the ones `collect` uses: neither the drafter
nor the policy trained on them, and MT-Bench (the evaluation) is never among them. Both stages
replay greedy outputs (`runtime/replay_rule.py`): exact counts from drafter forwards, priced with
the step-cost table, so nothing here is a wall-clock timing.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path


def _engine_and_rule(recipe, batch_size: int):
    from blockpilot.runtime.config import resolve_drafter_dir
    from blockpilot.runtime.step_verify import StepCostTable, VerifyMode, VerifyRule

    from .pipeline import _engine

    engine = _engine(recipe, batch_size)
    rule = engine.verify_rule
    if recipe.verify.step_costs:
        rule = VerifyRule(VerifyMode.AUTO, StepCostTable.load(recipe.verify.step_costs), rule.calibration)
    if rule.costs is None:
        raise ValueError("the verify stages need a step-cost table: set verify.step_costs in the recipe or "
                         "$BLOCKPILOT_STEP_COSTS (blockpilot step-costs --output FILE)")
    from blockpilot.runtime.config import EngineConfig

    drafter_dir = resolve_drafter_dir(EngineConfig(model=recipe.model, drafter=recipe.drafter))
    return engine, rule, drafter_dir


def _sequences(engine, records, reference_dir: Path, max_new_tokens: int, batch_size: int, temperature: float = 0.0):
    """Outputs of `records` (greedy, or sampled at `temperature` seeded per prompt; generated once
    into `reference_dir`, resumable), ready for replay: sampled ones with the engine's drafts
    (sampled drafts by default, so with the target's probability of every token)."""
    from blockpilot.runtime.replay import prepare, token_probabilities
    from blockpilot.runtime.training.datagen import generate_responses, read_responses

    from .pipeline import _drop_stale

    _drop_stale(reference_dir, {"target": engine.target.fingerprint(), "dtype": str(engine.target.dtype),
                                "max_new_tokens": max_new_tokens, "temperature": temperature})
    generate_responses(engine, records, reference_dir, max_new_tokens=max_new_tokens, shard_size=batch_size,
                       temperature=temperature)
    wanted = {r.id for r in records}
    outputs = [o for o in read_responses(reference_dir) if o["id"] in wanted]
    layers = list(engine.drafter.config.target_layer_ids)
    tokens = [o["prompt_ids"] + o["response_ids"] for o in outputs]
    features = engine.target.sequence_features(tokens, layers)
    probs = (token_probabilities(engine.target, tokens, temperature) if temperature and engine.sampled_drafts
             else [None] * len(outputs))
    return [prepare(engine.drafter, o["id"], t, len(o["prompt_ids"]), f, max_new_tokens, temperature, p)
            for o, t, f, p in zip(outputs, tokens, features, probs)]


def calibrate_stage(recipe) -> Path:
    """Fit per-position temperatures; write the calibration file and its reliability diagram."""
    from blockpilot.runtime.replay_rule import calibration_samples
    from blockpilot.runtime.step_verify import CALIBRATION_FILE, fit_calibration

    from .pipeline import _records

    spec = recipe.verify
    engine, _, drafter_dir = _engine_and_rule(recipe, recipe.collect.batch_size)
    policy_part = _records(type(recipe.collect)(prompts=recipe.collect.prompts,
                                                prompt_set_sha256=recipe.collect.prompt_set_sha256))
    held_apart = policy_part[recipe.collect.num_prompts or 0:][: spec.calibration_prompts]
    if not held_apart:
        raise ValueError("no calibration prompts: every policy-part prompt is already used by collect")
    sequences = _sequences(engine, held_apart, recipe.path("calibration-reference"), spec.calibration_max_new_tokens,
                           recipe.collect.batch_size)
    samples = calibration_samples(engine.target, engine.drafter, sequences, spec.calibration_block_size)
    grids, hits = samples.stacked()
    dataset = (f"{len(sequences)} held-apart policy-part prompts ({held_apart[0].id} ...), greedy, "
               f"{spec.calibration_max_new_tokens} new tokens, drafts reached at full verify of block "
               f"{spec.calibration_block_size}; never MT-Bench, never drafter or policy training data")
    calibration = fit_calibration(grids, hits, dataset)
    # the same prompts answered at temperature 1: what a sampled request's drafts are worth
    sampled_sequences = _sequences(engine, held_apart, recipe.path("calibration-reference-t1"),
                                   spec.calibration_max_new_tokens, recipe.collect.batch_size, temperature=1.0)
    sampled_grids, sampled_hits = calibration_samples(engine.target, engine.drafter, sampled_sequences,
                                                      spec.calibration_block_size).stacked()
    calibration = dataclasses.replace(calibration, sampled=fit_calibration(
        sampled_grids, sampled_hits, dataset.replace("greedy", "sampled at temperature 1")))
    output = Path(spec.calibration_output) if spec.calibration_output else Path(drafter_dir) / CALIBRATION_FILE
    calibration.save(output)
    report_dirs = {recipe.path(""), *([Path(spec.report_dir)] if spec.report_dir else [])}
    for directory in report_dirs:
        directory.mkdir(parents=True, exist_ok=True)
        plot_reliability(grids, hits, calibration, directory / "calibration.png")
    print(f"calibration: {calibration.num_samples} drafts; temperatures "
          f"{[round(t, 2) for t in calibration.temperatures]}; ECE before {[round(e, 3) for e in calibration.ece_before]}"
          f" after {[round(e, 3) for e in calibration.ece_after]}; sampled at temperature 1: temperatures "
          f"{[round(t, 2) for t in calibration.sampled.temperatures]}, ECE before "
          f"{[round(e, 3) for e in calibration.sampled.ece_before]} after {[round(e, 3) for e in calibration.sampled.ece_after]}"
          f" -> {output}")
    return output


def plot_reliability(grids, hits, calibration, png_path: Path, positions: int = 3) -> None:
    """Reliability diagrams of the first draft positions: raw softmax vs calibrated."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from blockpilot.runtime.step_verify import TEMPERATURE_GRID, reliability_bins

    raw = int(torch.argmin((TEMPERATURE_GRID - 1.0).abs()))
    shown = [j for j in range(min(positions, len(grids))) if len(hits[j])]
    fig, axes = plt.subplots(1, len(shown), figsize=(4 * len(shown), 4), squeeze=False)
    for ax, j in zip(axes[0], shown):
        fitted = int(torch.argmin((TEMPERATURE_GRID - calibration.temperatures[j]).abs()))
        for column, label, colour in ((raw, "raw softmax", "tab:red"), (fitted, "calibrated", "tab:green")):
            bins = reliability_bins(grids[j][:, column], hits[j])
            ax.plot([b[0] for b in bins], [b[1] for b in bins], "o-", color=colour, label=label)
        ax.plot([0, 1], [0, 1], color="grey", ls="--", lw=0.8)
        ax.set(xlabel="drafter confidence", ylabel="accepted fraction", xlim=(0, 1), ylim=(0, 1),
               title=f"draft {j + 1}: ECE {calibration.ece_before[j]:.3f} -> {calibration.ece_after[j]:.3f} "
                     f"(n={len(hits[j])})")
        ax.legend()
    fig.suptitle(f"Drafter confidence vs acceptance, held-apart prompts (T = {[round(t, 2) for t in calibration.temperatures[:len(shown)]]})",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)


def eval_stage(recipe) -> dict:
    """Held-out comparison of verify rules on the evaluation prompts (MT-Bench), batch 1, projected."""
    from blockpilot.runtime.config import parse_sizes
    from blockpilot.runtime.policy import BlockSizePolicy
    from blockpilot.runtime.replay_rule import compare_verify_rules

    from .collect import prefill_feature_matrix
    from .pipeline import _records

    spec = recipe.verify
    engine, rule, _ = _engine_and_rule(recipe, recipe.evaluate.batch_size)
    records = _records(recipe.evaluate)[: spec.eval_prompts]
    temperature = spec.eval_temperature
    suffix = f"-t{temperature:g}" if temperature else ""  # sampled references and reports beside the greedy ones
    sequences = _sequences(engine, records, recipe.path("evaluate-reference" + suffix), recipe.evaluate.max_new_tokens,
                           recipe.evaluate.batch_size, temperature)
    choice = None
    if Path(recipe.output).exists():
        policy = BlockSizePolicy.load(recipe.output, engine.target, engine.drafter)
        by_id = {r.id: r for r in records}
        kept = [by_id[s.id] for s in sequences]
        choice = dict(zip([r.id for r in kept], policy.choose(prefill_feature_matrix(engine, kept))))
    sizes = sorted(set(parse_sizes(spec.eval_sizes)) | (set(choice.values()) if choice else set()))
    report = compare_verify_rules(engine.target, engine.drafter, sequences, sizes, rule, choice)
    report["setup"] = {"prompts": len(sequences), "source": recipe.evaluate.prompts, "temperature": temperature,
                       "max_new_tokens": recipe.evaluate.max_new_tokens, "batch_size": 1,
                       "step_costs": rule.costs.source, "step_costs_setup": rule.costs.setup,
                       "calibration": rule.calibration.source if rule.calibration else "raw probabilities",
                       "policy": str(recipe.output) if choice else None,
                       "policy_choices": {str(s): sum(1 for c in choice.values() if c == s) for s in sizes}
                       if choice else None}
    table = format_report(report)
    print(table)
    for directory in {recipe.path(""), *([Path(spec.report_dir)] if spec.report_dir else [])}:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / f"verify_eval{suffix}.json").write_text(json.dumps(report, indent=2) + "\n")
        (directory / f"verify_eval{suffix}.txt").write_text(table + "\n")
        plot_report(report, directory / f"verify_eval{suffix}.png")
    return report


def format_report(report: dict) -> str:
    setup = report["setup"]
    best = report["variants"][report["best_fixed_full_verify"]]["tokens_per_s"]
    sampling = f"temperature {setup['temperature']:g}" if setup.get("temperature") else "greedy"
    lines = [f"{setup['prompts']} {setup['source']} prompts x {setup['max_new_tokens']} tokens, {sampling}, batch 1, "
             f"projected with {setup['step_costs']} ({setup['calibration']})",
             f"{'variant':<34} {'tok/s':>7} {'x plain':>7} {'vs best fixed':>13} {'accept len':>10} "
             f"{'drafted/step':>12} {'verified/step':>13} {'cut steps':>9} {'no-draft steps':>14}"]
    for name, v in report["variants"].items():
        lines.append(f"{name:<34} {v['tokens_per_s']:>7.2f} {v['x_plain']:>7.3f} {v['tokens_per_s'] / best - 1:>+13.1%} "
                     f"{v['acceptance_length']:>10.3f} {v['drafted_per_step']:>12.2f} {v['verified_per_step']:>13.2f} "
                     f"{v['cut_rate']:>9.1%} {v['steps_without_drafter']:>14.1%}")
    lines.append(f"best fixed size with full verify: {report['best_fixed_full_verify']}")
    return "\n".join(lines)


def plot_report(report: dict, png_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["variants"])[::-1]
    values = [report["variants"][n]["x_plain"] for n in names]
    colours = ["tab:green" if ("rule" in n) else "tab:purple" if "oracle" in n else "grey" if n == "plain"
               else "tab:blue" for n in names]
    fig, ax = plt.subplots(figsize=(8, 0.32 * len(names) + 1.5))
    ax.barh(names, values, color=colours)
    ax.axvline(1.0, color="grey", lw=0.8, ls="--")
    setup = report["setup"]
    ax.set(xlabel="projected decode tokens/s relative to plain decoding (batch 1)",
           title=f"Per-step verify: {setup['prompts']} {setup['source']} prompts x {setup['max_new_tokens']} tokens "
                 f"(green: the rule)")
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
