"""The policy pipeline a user runs for their own target/drafter pair, driven by one YAML recipe:

    blockpilot collect       --config R   # every prompt at every candidate size + prefill features
    blockpilot train-policy  --config R   # oracle labels -> MLP (split by prompt), every objective
    blockpilot export-policy --config R   # ONNX with metadata, checked against PyTorch, latency
    blockpilot eval-policy   --config R   # held-out: fixed sizes vs policy vs oracle vs random/constant

Each stage reads what the previous one wrote into `work_dir`; collection resumes where it stopped.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .train import PolicyTrainConfig

log = logging.getLogger(__name__)


@dataclass
class CollectConfig:
    prompts: str = "policy-part"  # "policy-part" (generated prompts no drafter trained on), "mtbench", or a JSONL path
    num_prompts: int | None = None
    max_new_tokens: int = 128
    batch_size: int = 16
    method: str = "replay"  # "replay" (counts from one greedy run per prompt) or "run" (every size run, raw timings)
    prompt_set_sha256: str | None = None  # with "policy-part": the digest the generated prompt set must have

    def __post_init__(self):
        if self.method not in ("replay", "run"):
            raise ValueError(f"collect method must be 'replay' or 'run', got {self.method!r}")


@dataclass
class VerifyRecipe:
    """The `verify:` section: the per-step verify rule's calibrate-verify and eval-verify stages
    (`verify_pipeline.py`)."""

    calibration_prompts: int = 64  # policy-part prompts after collect.num_prompts
    calibration_max_new_tokens: int = 128
    calibration_block_size: int = 8  # drafts reached at full verify of this width are the fitting data
    calibration_output: str | None = None  # default: verify_calibration.json beside the drafter
    step_costs: str | None = None  # default: the engine's table ($BLOCKPILOT_STEP_COSTS or the shipped one)
    eval_sizes: str = "2,3,4,6,8"
    eval_prompts: int | None = None  # the first N evaluation prompts (default: all of them)
    eval_temperature: float = 0.0  # the evaluation's references sampled at this temperature (0: greedy)
    report_dir: str | None = None


@dataclass
class PolicyRecipe:
    work_dir: str
    output: str  # the .onnx file written by export-policy
    model: str | None = None
    drafter: str = "default"
    dtype: str = "float32"
    candidate_sizes: str = "12-20"
    report_dir: str | None = None  # eval-policy also writes its table, JSON and PNG here (the shipped policy's: docs/)
    collect: CollectConfig = field(default_factory=CollectConfig)
    evaluate: CollectConfig = field(default_factory=lambda: CollectConfig(prompts="mtbench"))
    train: PolicyTrainConfig = field(default_factory=PolicyTrainConfig)
    verify: VerifyRecipe = field(default_factory=VerifyRecipe)  # calibrate-verify / eval-verify

    @classmethod
    def from_yaml(cls, path: str | Path) -> "PolicyRecipe":
        from blockpilot.runtime.config import load_yaml_config

        return load_yaml_config(cls, path)

    @property
    def sizes(self) -> list[int]:
        from blockpilot.runtime.config import parse_sizes

        sizes = parse_sizes(str(self.candidate_sizes))
        if len(sizes) < 2:
            raise ValueError(f"a policy needs at least 2 candidate sizes, got {sizes}")
        return sizes

    def path(self, name: str) -> Path:
        return Path(self.work_dir) / name


def _engine(recipe: PolicyRecipe, batch_size: int):
    from blockpilot.runtime.config import EngineConfig, build_engine

    # Every request names its size; the engine's default (the largest candidate) only has to be valid,
    # which the drafter's training size need not be when the candidates lie below it.
    return build_engine(EngineConfig(model=recipe.model, drafter=recipe.drafter, dtype=recipe.dtype,
                                     block_size=max(recipe.sizes), max_batch_size=batch_size,
                                     max_block_size=max(recipe.sizes)),
                        untrained_drafter_if_missing=False)


def _records(spec: CollectConfig):
    from blockpilot.runtime.prompts import mtbench_records, read_prompts

    if spec.prompts == "mtbench":
        records = mtbench_records()
    elif spec.prompts == "policy-part":
        from blockpilot.runtime.training.prompt_sets import check_prompt_set, prompt_part, training_prompts

        prompts = training_prompts()
        check_prompt_set(prompts, spec.prompt_set_sha256, "policy recipe prompt_set_sha256")
        records = [r for r in prompts if prompt_part(r.id) == "policy"]
    else:
        records = read_prompts(spec.prompts)
    return records[: spec.num_prompts] if spec.num_prompts else records


def step_costs(recipe: PolicyRecipe, engine, made_with: dict) -> dict:
    """The deployment machine's step-cost table, measured once and kept in work_dir (again after the
    target, the drafter or its draft vocabulary changed, `made_with`: a step's draft cost is theirs)."""
    from blockpilot.runtime.step_cost import TABLE_REPEATS, measure_step_costs

    path = recipe.path("step_costs.json")
    _drop_stale(path, {**made_with, "sizes": sorted({1, *recipe.sizes})})
    if path.exists():
        return json.loads(path.read_text())
    log.warning("measuring the step-cost table once (keep the machine otherwise idle): %s", path)
    costs = measure_step_costs(engine.target, engine.drafter, sorted({1, *recipe.sizes}), repeats=TABLE_REPEATS)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(costs, indent=2) + "\n")
    return json.loads(path.read_text())


def drafter_inputs(drafter) -> dict:
    """What counts and step costs depend on of the drafter: its weights and shape, and the tokens it
    drafts from."""
    from blockpilot.runtime.draft_vocab import drafts_from
    from blockpilot.runtime.policy import drafter_fingerprint

    return {"drafter": drafter_fingerprint(drafter) if drafter is not None else None,
            "draft_vocab": drafts_from(drafter.vocabulary if drafter is not None else None)}


def _drop_stale(output: Path, made_with: dict) -> None:
    """Remove a stage output (a file, or a folder of references) made from other inputs than this
    run's (a resumed collection would otherwise train the policy on, say, the previous drafter's
    acceptance without a word); then record what the output about to be written is made with, beside
    it (`<name>_made_with.json`)."""
    made_with = json.loads(json.dumps(made_with))  # as it reads back from the file
    record = output.with_name(output.stem + "_made_with.json")
    if output.exists():
        before = json.loads(record.read_text()) if record.exists() else {}
        changed = [key for key in made_with if before.get(key) != made_with[key]]
        if changed:
            why = (f"made with another {', '.join(changed)} than now" if before
                   else f"no record of what it was made with ({record.name})")
            print(f"{output.name}: {why}; making it again")
            shutil.rmtree(output) if output.is_dir() else output.unlink()
    output.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(made_with, indent=2) + "\n")


def collect_stage(recipe: PolicyRecipe, which: str = "collect") -> None:
    """Counts for every prompt at every candidate size, plus each prompt's prefill features.

    `method: replay` (the default) generates each prompt's greedy output once and replays every size
    on it (runtime/replay.py: the engine's exact counts, drafter forwards only, ~5x cheaper here);
    `method: run` runs the engine at every size and keeps the raw decode times too."""
    from .collect import prefill_feature_matrix, run_every_size

    spec = getattr(recipe, which)
    engine = _engine(recipe, spec.batch_size)
    records = _records(spec)
    runs = recipe.path(f"{which}_runs.jsonl")
    features_path = recipe.path(f"{which}_features.npz")
    # The greedy references depend on the target alone and are kept; the prefill features on the target
    # and the layers the drafter reads; the step costs and the counts replayed on the references on the
    # drafter as well. Each fingerprint is computed once (they read weights).
    target = {"target": engine.target.fingerprint(), "dtype": recipe.dtype}
    drafter = drafter_inputs(engine.drafter)
    step_costs(recipe, engine, {**target, **drafter})
    _drop_stale(features_path, {**target, "layers": engine.capture_layers})
    _drop_stale(runs, {**target, **drafter, "sizes": recipe.sizes,
                       "max_new_tokens": spec.max_new_tokens, "method": spec.method})
    if spec.method == "run":
        run_every_size(engine, records, recipe.sizes, runs, max_new_tokens=spec.max_new_tokens,
                       batch_size=spec.batch_size)
    elif not runs.exists():
        from blockpilot.runtime.replay import replay_every_size
        from blockpilot.runtime.training.datagen import generate_responses, read_responses

        reference = recipe.path(f"{which}-reference")
        _drop_stale(reference, {**target, "max_new_tokens": spec.max_new_tokens})  # the target's answers alone
        generate_responses(engine, records, reference, max_new_tokens=spec.max_new_tokens, shard_size=spec.batch_size)
        outputs = read_responses(reference)
        rows = replay_every_size(engine.target, engine.drafter, outputs, recipe.sizes, spec.max_new_tokens)
        response = {o["id"]: o["response_ids"] for o in outputs}
        runs.write_text("".join(json.dumps({**r, "token_ids": response[r["id"]]}) + "\n" for r in rows))
    if not features_path.exists():
        features = prefill_feature_matrix(engine, records)
        np.savez(features_path, ids=np.array([r.id for r in records]), features=features)
    print(f"{which}: {len(records)} prompts x sizes {recipe.sizes} in {recipe.work_dir}")


def _load(recipe: PolicyRecipe, which: str):
    from .collect import oracle_labels, read_rows

    rows = read_rows(recipe.path(f"{which}_runs.jsonl"))
    data = np.load(recipe.path(f"{which}_features.npz"))
    costs = json.loads(recipe.path("step_costs.json").read_text())
    return rows, [str(i) for i in data["ids"]], data["features"], costs, oracle_labels(rows, costs, recipe.sizes)


def train_stage(recipe: PolicyRecipe) -> None:
    import torch

    from blockpilot.runtime.policy import PolicyFeatureSpec

    from .collect import relative_speeds
    from .train import OBJECTIVES, train_policy

    rows, ids, features, costs, oracle = _load(recipe, "collect")
    engine_drafter = _engine(recipe, 1).drafter
    spec = PolicyFeatureSpec.for_drafter(engine_drafter)
    speeds = relative_speeds(rows, costs, recipe.sizes)
    results = {}
    for objective in OBJECTIVES:
        config = PolicyTrainConfig(**{**asdict(recipe.train), "objective": objective})
        label_kind = "acceptance" if objective == "acceptance" else "speed"
        labels = {pid: oracle[pid][label_kind] for pid in oracle}
        model, summary = train_policy(ids, features, labels, recipe.sizes, spec, config, speeds)
        torch.save({"state": model.state_dict(), "config": model.config.to_dict(), "summary": summary},
                   recipe.path(f"policy_{objective}.pt"))
        results[objective] = summary
    recipe.path("train_summary.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({k: v["accuracy"] for k, v in results.items()}))


def _load_model(recipe: PolicyRecipe, objective: str):
    import torch

    from .model import PolicyMLP, PolicyModelConfig

    saved = torch.load(recipe.path(f"policy_{objective}.pt"), weights_only=False)
    model = PolicyMLP(PolicyModelConfig(**saved["config"]))
    model.load_state_dict(saved["state"])
    return model.eval(), saved["summary"]


def _choices(model, ids: list[str], features: np.ndarray, sizes: list[int]) -> dict[str, int]:
    import torch

    with torch.no_grad():
        picked = model(torch.from_numpy(features).float()).argmax(-1).tolist()
    return {pid: sizes[c] for pid, c in zip(ids, picked)}


SURE_WIN = 0.95  # a trained policy ships over one size only if it wins in this share of resamples


def export_stage(recipe: PolicyRecipe) -> None:
    """Export one size for every request (the best on the training prompts) unless a trained policy
    beats it on the validation prompts surely, in at least `SURE_WIN` of bootstrap resamples of them;
    of the objectives' policies that do, the one that projects most tokens/s. Where one size suits
    nearly every prompt (a CPU's cost cliff), a trained policy's few other picks win or lose by noise,
    and shipping it would cost speed on other prompts."""
    from blockpilot.runtime.policy import PolicyFeatureSpec, drafter_fingerprint

    from .export import export_policy
    from .train import OBJECTIVES, compare_policies, paired_win_rate, score_choices, split_of

    rows, ids, features, costs, oracle = _load(recipe, "collect")
    scored = [p for p in ids if p in oracle]
    validation = [p for p in scored if split_of(p, recipe.train) == "validation"]
    fitting = [p for p in scored if split_of(p, recipe.train) == "train"]
    constant_size = max(recipe.sizes, key=lambda s: score_choices(
        rows, costs, {p: s for p in fitting})["projected_tokens_per_s"])
    trained = {objective: _load_model(recipe, objective) for objective in OBJECTIVES}
    constant = f"constant-{constant_size}"
    models = {constant: (trained["speed"][0].always(recipe.sizes.index(constant_size)),
                         {"constant_size": constant_size, "prompts": len(fitting), "candidate_sizes": recipe.sizes}),
              **trained}
    one_size = {p: constant_size for p in validation}
    candidates = {}
    for objective, (model, summary) in models.items():
        choices = _choices(model, ids, features, recipe.sizes)
        report = compare_policies(rows, costs, validation, recipe.sizes, choices, oracle)
        report["win_rate_over_one_size"] = (None if objective == constant else
                                            paired_win_rate(rows, costs, {p: choices[p] for p in validation}, one_size))
        candidates[objective] = (report["variants"]["policy"]["projected_tokens_per_s"], model, summary, report)
    sure = [k for k, c in candidates.items() if k != constant and c[3]["win_rate_over_one_size"] >= SURE_WIN]
    objective = max(sure, key=lambda k: candidates[k][0]) if sure else constant
    _, model, summary, report = candidates[objective]
    engine = _engine(recipe, 1)
    spec = PolicyFeatureSpec.for_drafter(engine.drafter)
    spec = spec.with_normalisation(features[[ids.index(p) for p in ids if split_of(p, recipe.train) == "train"]])
    spec.mean, spec.std = model.feature_mean.tolist(), model.feature_std.tolist()
    training = {"objective": objective, "validation_projected_tokens_per_s": {k: v[0] for k, v in candidates.items()},
                "validation_win_rate_over_one_size": {k: v[3]["win_rate_over_one_size"] for k, v in candidates.items()},
                "validation_report": report, **summary}
    figures = export_policy(model, spec, recipe.sizes, engine.target.fingerprint(), drafter_fingerprint(engine.drafter),
                            training, recipe.output)
    recipe.path("export_summary.json").write_text(json.dumps(
        {"objective": objective, "validation_projected_tokens_per_s": training["validation_projected_tokens_per_s"],
         "validation_win_rate_over_one_size": training["validation_win_rate_over_one_size"], **figures}, indent=2) + "\n")
    print(f"validation ({len(validation)} prompts), projected tokens/s: " + ", ".join(
        f"{k} {v[0]:.2f}" + (f" (beats {constant} in {v[3]['win_rate_over_one_size']:.0%} of resamples)"
                             if k != constant else "") for k, v in candidates.items()))
    print(f"export: {recipe.output} (objective {objective}); ORT {figures.get('ort_latency_ms_batch1')} ms per request")


def eval_stage(recipe: PolicyRecipe) -> None:
    """Held-out prompts: every candidate size run, the exported policy's choices through ONNX Runtime."""
    from blockpilot.runtime.policy import BlockSizePolicy

    from .train import OBJECTIVES, compare_policies, score_choices

    collect_stage(recipe, "evaluate")
    rows, ids, features, costs, oracle = _load(recipe, "evaluate")
    engine = _engine(recipe, 1)
    policy = BlockSizePolicy.load(recipe.output, engine.target, engine.drafter)
    choice = dict(zip(ids, policy.choose(features)))
    held_out = [p for p in ids if p in oracle]
    report = compare_policies(rows, costs, held_out, recipe.sizes, choice, oracle)
    report["policy_choice_distribution"] = {str(s): sum(1 for p in held_out if choice[p] == s) for s in recipe.sizes}
    for objective in OBJECTIVES:  # every objective's PyTorch policy, the shipped one included
        if recipe.path(f"policy_{objective}.pt").exists():
            picked = _choices(_load_model(recipe, objective)[0], ids, features, recipe.sizes)
            report["variants"][f"policy-{objective}-objective"] = score_choices(rows, costs, {p: picked[p] for p in held_out})
    report["setup"] = {"prompts": len(held_out), "source": recipe.evaluate.prompts,
                       "max_new_tokens": recipe.evaluate.max_new_tokens, "candidate_sizes": recipe.sizes,
                       "step_costs": {k: costs[k] for k in ("dtype", "threads", "context_tokens", "batch_size")}}
    table = format_comparison(report)
    print(table)
    _write_eval_report(recipe, report, table)  # kept even if the per-step analysis below is stopped
    variation = variation_report(recipe, engine, rows, costs)
    report["within_request_variation"] = variation
    print(f"within-request variation: {json.dumps(variation['tokens_per_s'])} tokens/s (projected); the per-step "
          f"oracle's choice equals the request's best size in {variation['per_step_choice_equals_request_best']:.0%} of steps")
    _write_eval_report(recipe, report, table)


def _write_eval_report(recipe: PolicyRecipe, report: dict, table: str) -> None:
    """eval_report.json/.txt/.png into the work dir and the recipe's report_dir."""
    for directory in {recipe.path(""), *([Path(recipe.report_dir)] if recipe.report_dir else [])}:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "eval_report.json").write_text(json.dumps(report, indent=2) + "\n")
        (directory / "eval_report.txt").write_text(table + "\n")
        plot_comparison(report, directory / "eval_report.png")


def variation_report(recipe: PolicyRecipe, engine, rows: list[dict], costs: dict) -> dict:
    """Replay each held-out greedy output at every candidate size and with a per-step oracle."""
    from blockpilot.runtime.prompts import encode_prompt
    from blockpilot.runtime.replay import acceptance_profile, prepare

    from .analysis import within_request_variation

    records = {r.id: r for r in _records(recipe.evaluate)}
    outputs = {r["id"]: r["token_ids"] for r in rows if r["block_size"] == recipe.sizes[0]}
    layers = list(engine.drafter.config.target_layer_ids)
    profiles = {}
    for prompt_id, output in tqdm(outputs.items(), desc="acceptance profiles", unit="prompt"):
        tokens = encode_prompt(engine.target.tokenizer, records[prompt_id]) + output
        sequence = prepare(engine.drafter, prompt_id, tokens, len(tokens) - len(output),
                           engine.target.sequence_features([tokens], layers)[0], recipe.evaluate.max_new_tokens)
        profiles[prompt_id] = acceptance_profile(engine.target, engine.drafter, sequence, recipe.sizes)
    return within_request_variation(profiles, recipe.sizes, costs)


def plot_comparison(report: dict, png_path: Path) -> None:
    """Two bar charts, one row per variant: projected tokens/s and acceptance length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["variants"])
    values = report["variants"]
    colours = ["tab:red" if n.startswith("policy") else "tab:green" if n.startswith("oracle")
               else "tab:grey" if n.startswith(("random", "constant")) else "tab:blue" for n in names]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 0.35 * len(names) + 1.5), sharey=True)
    left.barh(names, [values[n]["projected_tokens_per_s"] for n in names], color=colours)
    left.set(xlabel="projected decode tokens/s (counts x step-cost table)", title="Speed")
    right.barh(names, [values[n]["acceptance_length"] for n in names], color=colours)
    right.set(xlabel="tokens per target forward", title="Acceptance length")
    left.invert_yaxis()
    setup = report.get("setup", {})
    fig.suptitle(f"held-out {setup.get('source', '')}: {setup.get('prompts', '?')} prompts x "
                 f"{setup.get('max_new_tokens', '?')} tokens, greedy; best fixed size {report['best_fixed_size']}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)


def format_comparison(report: dict) -> str:
    lines = [f"{'variant':<32} {'accept len':>10} {'fwd/token':>9} {'proj tok/s':>10}"]
    for name, v in report["variants"].items():
        lines.append(f"{name:<32} {v['acceptance_length']:>10.3f} {v['target_forwards_per_token']:>9.4f} "
                     f"{v['projected_tokens_per_s']:>10.2f}")
    lines.append(f"best fixed size {report['best_fixed_size']}; policy closes {report['gap_closed_to_oracle']} "
                 f"of the gap from best fixed to the per-prompt oracle (projected tokens/s)")
    return "\n".join(lines)
