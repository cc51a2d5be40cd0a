"""`blockpilot train-drafter`: the drafter recipe as one YAML file, run in resumable stages.

Stages: `data` (the target's own responses), `train` (drafter layers only, target frozen),
`eval` (acceptance curve on held-out prompts). Each stage checkpoints; rerunning continues.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

from ..blocks import DEFAULT_BLOCK_SIZE


@dataclass
class DataConfig:
    max_new_tokens: int = 256
    batch_size: int = 48
    num_prompts: int | None = None
    self_questions: int = 0  # question requests: the target writes questions, then answers them
    question_temperature: float = 0.8
    question_samples: int = 1  # each distinct question request asked this many times (another seed each)
    follow_ups: bool = False  # + a second turn on each finished self-question answer (multi-turn data)
    # instruction requests a run adds (Magpie): the target, given its chat template up to the user turn,
    # writes a user's message (sampled), then answers it (greedy); numbered on from earlier runs' requests
    instructions: int = 0
    instruction_temperature: float = 1.0
    instruction_max_tokens: int = 128
    # where the responses are kept (a ResponseStore), relative to the repository root: a folder that a
    # fresh clone has and each run adds to; null: work_dir/data
    store: str | None = None
    check_every: int = 8  # generation steps between looks for finished rows (each look waits for the device)
    device_dtype: str = "bfloat16"  # the target's dtype for generating on a GPU
    # ... and on a CPU (null: the recipe's `dtype`): bfloat16 generates ~2x faster than float32 on a CPU
    # with AMX (`make data-dtypes` prints both); the responses stay the target's, now in bf16 as on a GPU
    cpu_dtype: str | None = None
    # SHA-256 (16 hex) of `training_prompts()` as built when the recipe was made: the set depends on
    # the interpreter's standard library, so a rebuild checks it (prompt_sets.check_prompt_set).
    prompt_set_sha256: str | None = None


@dataclass
class DrafterShape:
    num_layers: int = 1
    num_target_features: int = 4
    block_size: int = DEFAULT_BLOCK_SIZE
    # drafts come from the training responses' N most frequent tokens (runtime/draft_vocab.py; 0 = every
    # token): the draft's lm_head is that much smaller, and the drafter is validated and shipped with it
    draft_vocab: int = 0


@dataclass
class TrainConfig:
    steps: int = 2000
    learning_rate: float = 6e-4
    warmup_steps: int = 100
    weight_decay: float = 0.01
    sequences_per_step: int = 8
    anchors_per_sequence: int = 16
    loss_decay: float = 0.9  # weight of block position k is loss_decay ** (k - 1)
    loss_gamma: float = 0.0  # > 0: weight exp(-(k - 1) / loss_gamma) instead (z-lab's and SpecForge's form, gamma 7)
    loss_chunk_positions: int = 4096  # the vocabulary head's loss runs over this many positions at a time
    vocab_shortlist: int = 16384  # softmax over the most frequent response tokens (0 = full vocabulary)
    # 0: cross-entropy on the target's tokens only; s > 0: (1 - s) * that + s * KL to the target's own
    # distribution at each position (the features stage then stores the target's final hidden state)
    soft_target_weight: float = 0.0
    init_from: str | None = None  # a saved drafter of this shape to continue from (else a fresh one)
    # Trains on the store's shards from this one on (0: all of them): a continuation on the responses
    # its start has not seen needs no features of the earlier shards. The token statistics (the draft
    # vocabulary, the loss's shortlist) still count every stored training response.
    from_shard: int = 0
    # bf16 autocast on a CPU too (as on a GPU; master weights stay float32): 1.5-1.6x float32's rate on a
    # CPU with AMX (`make train-throughput TRAIN_BENCH_SET="--set train.cpu_autocast=true"` against without)
    cpu_autocast: bool = False
    # With a time budget (--minutes), the learning rate's cosine also runs over that budget: it decays by
    # whichever is further on, the steps or the training time. A run on a machine whose step rate is not
    # known beforehand (a GPU reached for minutes) still ends its schedule when its time ends.
    decay_within_budget: bool = False
    checkpoint_every: int = 100
    validate_every: int = 250
    validate_block_sizes: list[int] = field(default_factory=list)  # replayed acceptance also at these sizes
    # the first this many held-out sequences (None: all): a replay runs on the CPU, and a run with minutes
    # to spend must not spend them validating a store that grew
    validate_sequences: int | None = None
    seed: int = 0


@dataclass
class EvalConfig:
    block_sizes: str = "2-24"  # every size whose acceptance and projected speed go into the model card
    num_prompts: int | None = None  # MT-Bench first turns (held out from training by source); None = all 80
    max_new_tokens: int = 256
    batch_size: int = 16
    # Also replayed on the target's answers sampled at this temperature (seeded per prompt): sampled
    # speculative decoding accepts a draft when it equals the target's sample, so replaying a sampled
    # output counts what it does (tests/test_replay.py). None: greedy only.
    sampled_temperature: float | None = None


@dataclass
class DrafterRecipe:
    work_dir: str
    output_dir: str
    model: str | None = None
    dtype: str = "float32"
    data: DataConfig = field(default_factory=DataConfig)
    drafter: DrafterShape = field(default_factory=DrafterShape)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    notes: str = ""  # how the recipe was chosen; copied into the model card
    source: str = ""  # the YAML file it was read from (from_yaml sets it; the model card names it)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "DrafterRecipe":
        from ..config import load_yaml_config

        recipe = load_yaml_config(cls, path)
        recipe.source = str(path)
        return recipe

    @property
    def data_dir(self) -> Path:
        return Path(self.work_dir) / "data"

    @property
    def store_dir(self) -> Path:
        return Path(self.data.store) if self.data.store else self.data_dir

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.work_dir) / "checkpoints"


def run_data_stage(recipe: DrafterRecipe, minutes: float | None = None) -> None:
    """The target's responses added to the recipe's store, most wanted first (a run cut short by
    `minutes` keeps what it made, and the next run continues): answers to instructions the target
    writes itself, then second turns on them, then the stdlib-built training prompts. MT-Bench's
    prompts and wordings are kept out, repeats (by normalised text) dropped."""
    import time

    from ..prompts import encode_prompt
    from .datagen import append_responses
    from .prompt_sets import (HeldOut, check_prompt_set, follow_up_prompts, instruction_prefix, instruction_requests,
                              next_instruction_request, prompt_part, question_requests, self_question_prompts,
                              training_prompts, unique_records, written_instructions)
    from .response_store import ResponseStore

    deadline = time.monotonic() + minutes * 60 if minutes else None
    prompts = training_prompts()
    check_prompt_set(prompts, recipe.data.prompt_set_sha256, "drafter recipe data.prompt_set_sha256")
    generator = _data_generator(recipe)
    target, data = generator.target, recipe.data
    tokenizer = target.tokenizer
    fingerprint = target.weights_fingerprint()
    store = ResponseStore(recipe.store_dir, target=fingerprint)
    asked = ResponseStore(recipe.store_dir / "instructions", unique_prompts=False, target=fingerprint)
    before = len(store)
    chunk = data.batch_size * 4
    generate = partial(append_responses, generator, chunk=chunk, deadline=deadline)
    chat = partial(encode_prompt, tokenizer)
    held_out = HeldOut()
    # The policy's prompts are never the drafter's: their responses would go unused here.
    drafter_only = lambda records: [r for r in unique_records(records, held_out) if prompt_part(r.id) != "policy"]

    if data.instructions:
        prefix = instruction_prefix(tokenizer)
        requests = instruction_requests(next_instruction_request(asked.ids()), data.instructions)
        generate(requests, asked, lambda r: prefix, max_new_tokens=data.instruction_max_tokens,
                 temperature=data.instruction_temperature)
    if data.self_questions:
        generate(question_requests(data.self_questions, samples=data.question_samples), asked, chat,
                 max_new_tokens=64, temperature=data.question_temperature)
    written = asked.rows()
    instructions = drafter_only(written_instructions(written, tokenizer) + self_question_prompts(written, tokenizer))
    generate(instructions, store, chat, max_new_tokens=data.max_new_tokens)
    if data.follow_ups:
        texts = {r.id: r.prompt for r in instructions}
        answers = [row for row in store.rows() if row["id"] in texts]
        generate(drafter_only(follow_up_prompts(answers, texts, tokenizer)), store, chat,
                 max_new_tokens=data.max_new_tokens)
    records = drafter_only(prompts)
    generate(records[: data.num_prompts] if data.num_prompts else records, store, chat,
             max_new_tokens=data.max_new_tokens)
    print(f"data: {len(store) - before} new responses, {len(store)} in all in {recipe.store_dir} "
          f"({len(asked)} instruction requests made)")


def _data_generator(recipe: DrafterRecipe):
    """The batched generator over the recipe's target: on a GPU in `data.device_dtype`, else on the CPU
    in `data.cpu_dtype` (or the recipe's `dtype`)."""
    from ..assets import ensure_default_model
    from ..target import TargetModel
    from .datagen import DeviceGenerator
    from .train_drafter import training_device

    device = training_device()
    dtype = recipe.data.device_dtype if device.type == "cuda" else (recipe.data.cpu_dtype or recipe.dtype)
    target = TargetModel.load(recipe.model or ensure_default_model(), dtype).to(device)
    return DeviceGenerator(target, batch_size=recipe.data.batch_size, check_every=recipe.data.check_every)


def run_bench_data_stage(recipe: DrafterRecipe) -> dict:
    """Generated tokens/s of the data stage's generator, printed: answers (greedy) to 2 x `data.batch_size`
    training prompts at `data.max_new_tokens`, and instructions the target writes itself (sampled)."""
    from ..prompts import encode_prompt
    from .datagen import measure_throughput
    from .prompt_sets import instruction_prefix, training_prompts

    generator = _data_generator(recipe)
    target, data = generator.target, recipe.data
    count = 2 * data.batch_size  # the refill path too: half the prompts start in freed slots
    prompts = [ids for ids in (encode_prompt(target.tokenizer, r) for r in training_prompts()[: 2 * count])
               if len(ids) <= 768][:count]
    figures = {"answers": measure_throughput(generator, prompts, data.max_new_tokens),
               "instructions": measure_throughput(generator, [instruction_prefix(target.tokenizer)] * count,
                                                  data.instruction_max_tokens, data.instruction_temperature)}
    where = f"{target.device.type}, {str(target.dtype).removeprefix('torch.')}, batch {data.batch_size}"
    for kind, f in figures.items():
        print(f"{kind}: {f['tokens_per_s']:.0f} generated tokens/s ({f['generated_tokens']} tokens, "
              f"{f['prompts']} prompts, {f['seconds']:.1f} s; {where})")
    return figures


def run_train_stage(recipe: DrafterRecipe, minutes: float | None = None) -> None:
    """Train to `train.steps` (resuming), or for `minutes` more training time: the drafter is saved
    either way, and a later run continues from the checkpoint."""
    import json

    from .parallel import join, leave
    from .train_drafter import split_by_part, train, training_hardware

    workers = join()  # under torchrun: one of N data-parallel processes
    with workers.main_first():  # the first computes what features are missing, the others then read them
        target, sequences, answers = _training_data(recipe, with_final_hidden=recipe.train.soft_target_weight > 0)
    log_path = Path(recipe.work_dir) / "train_log.jsonl"
    drafter = train(recipe, target, sequences, log_path, more_minutes=minutes, workers=workers, answers=answers)
    leave(workers)
    if not workers.main:
        return
    drafter.to(target.dtype).save(recipe.output_dir)
    last = json.loads(log_path.read_text().splitlines()[-1])
    train_set, validation = split_by_part(sequences)
    summary = {"sequences": len(train_set), "validation_sequences": len(validation),
               "store_shards": _shard_span(recipe),
               "tokens": int(sum(len(s.tokens) for s in train_set)),
               "response_tokens": int(sum(len(s.tokens) - s.prompt_len for s in train_set)),
               "steps": last["step"], "wall_time_s": last["elapsed_s"],
               "hardware": training_hardware(workers.world_size),
               "final_loss": last["loss"], "val_acceptance_length": last.get("val_acceptance_length"),
               "val_replayed_acceptance_length": last.get("val_replayed_acceptance_length"),
               "recipe": {"data": asdict(recipe.data), "drafter": asdict(recipe.drafter), "train": asdict(recipe.train)}}
    (Path(recipe.output_dir) / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"train: drafter saved to {recipe.output_dir} (held-out acceptance length, replayed decoding: "
          f"{summary['val_replayed_acceptance_length']})")


def run_bench_train_stage(recipe: DrafterRecipe, steps: int = 20) -> dict | None:
    """Supervised positions per second that training reaches at the recipe's shapes on this machine
    (`train_drafter.training_throughput`: synthetic data, no stage before it needed), printed."""
    import json

    from ..assets import ensure_default_model
    from ..target import TargetModel
    from .parallel import join, leave
    from .train_drafter import training_throughput

    workers = join()
    target = TargetModel.load(recipe.model or ensure_default_model(), recipe.dtype)
    result = training_throughput(recipe, target, steps, warmup=min(3, steps), workers=workers)
    leave(workers)
    if result:
        print(json.dumps(result))
        print(f"train throughput: {result['supervised_positions_per_s']:,.0f} supervised positions/s "
              f"({result['positions_per_step']:,} a step, {result['num_layers']}-layer drafter, block "
              f"{result['block_size']}, on {result['hardware']})")
    return result


def _training_data(recipe: DrafterRecipe, with_final_hidden: bool):
    """(target, training sequences, answers): the target loaded, its features computed for every data
    shard the recipe trains on (`train.from_shard` on) not done yet, and those sequences read back;
    the answers (response token ids) of every stored training-part record, for token statistics."""
    import numpy as np

    from ..assets import ensure_default_model
    from ..drafter import build_target_layer_ids
    from ..target import TargetModel
    from .features import compute_features, feature_dir, load_sequences
    from .prompt_sets import prompt_part
    from .response_store import ResponseStore
    from .train_drafter import training_device

    store = ResponseStore(recipe.store_dir)
    shards = store.shards()
    if not shards:
        raise ValueError(f"no training data in {recipe.store_dir}: run the data stage first")
    first = recipe.train.from_shard
    if not 0 <= first < len(shards):
        raise ValueError(f"train.from_shard {first}: {recipe.store_dir} has shards 0-{len(shards) - 1}")
    target = TargetModel.load(recipe.model or ensure_default_model(), recipe.dtype)
    layer_ids = build_target_layer_ids(target.num_layers, recipe.drafter.num_target_features)
    device = training_device()  # features on a GPU in bigger batches; the target then returns to the CPU,
    out_dir = feature_dir(recipe.data_dir, layer_ids, with_final_hidden)  # where training validates
    indexes = compute_features(target.to(device), shards[first:], out_dir, layer_ids,
                               batch_tokens=32768 if device.type == "cuda" else 4096, with_final_hidden=with_final_hidden)
    sequences = load_sequences(indexes, target.to("cpu").hidden_size)
    answers = [np.asarray(row["response_ids"]) for row in store.rows() if prompt_part(row["id"]) == "drafter-train"]
    return target, sequences, answers


def _shard_span(recipe: DrafterRecipe) -> str:
    """The store's shards a run trained on, as "FIRST-LAST of COUNT"."""
    from .response_store import ResponseStore

    count = len(ResponseStore(recipe.store_dir).shards())
    return f"{recipe.train.from_shard}-{count - 1} of {count}"


def run_eval_stage(recipe: DrafterRecipe) -> None:
    """Acceptance and projected speed at every block size on held-out MT-Bench prompts -> model card.

    The target's greedy output is generated once (plain, batched); every block size is then replayed
    on it (runtime/replay.py: the engine's exact counts, drafter forwards only)."""
    import json

    from ..config import EngineConfig, build_engine, parse_sizes
    from ..prompts import mtbench_records
    from ..replay import replay_every_size
    from ..step_cost import measure_step_costs
    from .datagen import generate_responses, read_responses
    from .model_card import summarise_curve, summarise_sampled, write_model_card

    sizes = sorted({1, *parse_sizes(recipe.eval.block_sizes)})
    engine = build_engine(EngineConfig(model=recipe.model, drafter=recipe.output_dir, dtype=recipe.dtype,
                                       max_batch_size=recipe.eval.batch_size, max_block_size=max(sizes)))
    records = mtbench_records(limit=recipe.eval.num_prompts)
    reference_dir = Path(recipe.work_dir) / "eval-reference"
    generate_responses(engine, records, reference_dir, max_new_tokens=recipe.eval.max_new_tokens,
                       shard_size=recipe.eval.batch_size)
    rows = replay_every_size(engine.target, engine.drafter, read_responses(reference_dir), sizes,
                             recipe.eval.max_new_tokens)
    runs = Path(recipe.work_dir) / "eval_runs.jsonl"
    runs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    costs = measure_step_costs(engine.target, engine.drafter, sizes)
    summary = summarise_curve(rows, costs)
    temperature = recipe.eval.sampled_temperature
    if temperature:
        sampled_dir = Path(recipe.work_dir) / f"eval-reference-t{temperature:g}"
        generate_responses(engine, records, sampled_dir, max_new_tokens=recipe.eval.max_new_tokens,
                           shard_size=recipe.eval.batch_size, temperature=temperature)
        sampled_rows = replay_every_size(engine.target, engine.drafter, read_responses(sampled_dir), sizes,
                                         recipe.eval.max_new_tokens, sampled_at=temperature)
        summary["sampled"] = summarise_sampled(temperature, sampled_rows, costs)
    (Path(recipe.output_dir) / "eval_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    write_model_card(recipe, summary)
    sampled = summary.get("sampled")
    for c in summary["curve"]:
        at_temperature = (f"; at temperature {sampled['temperature']:g}: "
                          f"{sampled['acceptance_length'][c['block_size']]:.2f}" if sampled else "")
        print(f"block {c['block_size']:>2}: acceptance {c['acceptance_length']:.2f} tokens/forward, "
              f"projected {c['projected_tokens_per_s']:.1f} tok/s ({c['projected_speedup']:.2f}x plain){at_temperature}")
    print(f"eval: model card written to {recipe.output_dir}/README.md")


SHIPPED_DRAFTER_FILES = ("config.json", "model.safetensors", "training_summary.json", "eval_summary.json")


def run_ship_stage(recipe: DrafterRecipe) -> None:
    """Ship the recipe's evaluated candidate (`output_dir`): its weights, config and summaries into the
    default drafter's asset folder, and its model card written there (the curve into docs/). The
    policy and the verify rule's calibration name the drafter they were fitted for: refit them next
    (`make refit`)."""
    import dataclasses
    import json
    import shutil

    from .. import assets
    from ..draft_vocab import FILE_NAME as DRAFT_VOCAB_FILE
    from .model_card import write_model_card

    asset = assets.DEFAULT_DRAFTER_DIR
    candidate = Path(recipe.output_dir)
    if candidate.resolve() == asset.resolve():
        raise SystemExit(f"--stage ship: {candidate} is the shipped drafter itself; nothing to ship")
    missing = [name for name in SHIPPED_DRAFTER_FILES if not (candidate / name).exists()]
    if missing:
        raise SystemExit(f"--stage ship: {candidate} lacks {', '.join(missing)}: train and evaluate it first "
                         f"(--stage train, then --stage eval)")
    for name in SHIPPED_DRAFTER_FILES:
        shutil.copyfile(candidate / name, asset / name)
    # the draft vocabulary goes with the weights it was evaluated with, and never outlives them
    (asset / DRAFT_VOCAB_FILE).unlink(missing_ok=True)
    if (candidate / DRAFT_VOCAB_FILE).is_file():
        shutil.copyfile(candidate / DRAFT_VOCAB_FILE, asset / DRAFT_VOCAB_FILE)
    write_model_card(dataclasses.replace(recipe, output_dir=str(asset)),
                     json.loads((asset / "eval_summary.json").read_text()))
    print(f"ship: {candidate} -> {asset} (model card and docs/drafter-acceptance.png rewritten); "
          f"refit the policy and the verify calibration next: make refit")


def with_overrides(recipe: DrafterRecipe, overrides: dict[str, object]) -> DrafterRecipe:
    """A copy of `recipe` with `section.field` settings replaced (e.g. {"train.soft_target_weight": 0.5})."""
    import copy
    import dataclasses

    changed = copy.deepcopy(recipe)
    for key, value in overrides.items():
        section_name, _, name = key.partition(".")
        section = getattr(changed, section_name, None)
        if not dataclasses.is_dataclass(section) or name not in {f.name for f in dataclasses.fields(section)}:
            raise ValueError(f"unknown recipe setting {key!r}; use section.field, e.g. train.loss_decay")
        setattr(changed, section_name, dataclasses.replace(section, **{name: value}))
    return changed


def parse_variant(spec: str) -> tuple[str, dict[str, object]]:
    """"soft:train.soft_target_weight=0.7,drafter.block_size=4" -> ("soft", {...}); values read as YAML
    (a list's commas stay inside its brackets: "train.validate_block_sizes=[2,4,8]")."""
    import re

    import yaml

    name, _, settings = spec.partition(":")
    if not name or not name.replace("-", "").replace("_", "").isalnum():
        raise ValueError(f"variant {spec!r}: start with a name (letters, digits, - and _), then ':' and settings")
    overrides = {}
    for item in filter(None, re.split(r",(?![^\[]*\])", settings)):
        key, equals, value = item.partition("=")
        if not equals:
            raise ValueError(f"variant {spec!r}: {item!r} is not key=value")
        overrides[key.strip()] = yaml.safe_load(value)
    return name, overrides


def run_compare_stage(recipe: DrafterRecipe, variants: list[str], minutes: float) -> dict:
    """Recipe variants trained for the same training time on the same data, from the same start (the
    recipe's `train.init_from`, or scratch): held-out replayed acceptance per variant (JSON, table, PNG
    in `work_dir/compare`; each variant's drafter in `compare/NAME/drafter`). How a recipe change is
    chosen: by learning per CPU-hour, side by side."""
    import json

    import torch

    from ..drafter import DFlashDraftModel
    from .train_drafter import split_by_part, train, validate

    parsed = [parse_variant(v) for v in variants]
    target, sequences, answers = _training_data(recipe, with_final_hidden=True)  # soft and hard variants alike
    out_dir = Path(recipe.work_dir) / "compare"
    out_dir.mkdir(parents=True, exist_ok=True)
    start = None
    if recipe.train.init_from:  # where every variant starts: its held-out figures at 0 minutes
        start = validate(DFlashDraftModel.load(recipe.train.init_from, dtype=torch.float32), target,
                         split_by_part(sequences)[1], recipe.drafter.block_size, recipe.train.validate_block_sizes)
        start.update(train_s=0.0, step=0)
    results = {}
    for name, overrides in parsed:
        variant = with_overrides(recipe, overrides)
        variant.work_dir = str(out_dir / name)
        log_path = out_dir / name / "train_log.jsonl"
        drafter = train(variant, target, sequences, log_path, total_minutes=minutes, answers=answers)
        drafter.to(target.dtype).save(out_dir / name / "drafter")  # for a replay on MT-Bench, or to ship
        records = [json.loads(line) for line in log_path.read_text().splitlines()]
        validated = ([start] if start else []) + [r for r in records if "val_replayed_acceptance_length" in r]
        results[name] = {"overrides": overrides, "steps": records[-1]["step"], "train_s": records[-1]["train_s"],
                         "supervised_per_s": records[-1]["supervised_per_s"], "final": validated[-1],
                         "curve": validated}
    (out_dir / "compare.json").write_text(json.dumps({"start": start, "variants": results}, indent=2) + "\n")
    sizes = sorted({int(k.rsplit("_", 1)[1]) for r in results.values() for k in r["final"]
                    if k.startswith("val_replayed_acceptance_at_")})
    starting_row = {"steps": 0, "train_s": 0.0, "supervised_per_s": 0.0, "final": start,
                    "overrides": f"train.init_from={recipe.train.init_from}"}
    lines = [f"| variant | steps | train s | supervised positions/s | replayed acceptance at the training size | "
             + " | ".join(f"at {s}" for s in sizes) + " | settings |",
             "|---|---|---|---|---|" + "---|" * len(sizes) + "---|"]
    for name, r in ([("start", starting_row)] if start else []) + list(results.items()):
        at = " | ".join(f"{r['final'].get(f'val_replayed_acceptance_at_{s}', float('nan')):.3f}" for s in sizes)
        lines.append(f"| {name} | {r['steps']} | {r['train_s']:.0f} | {r['supervised_per_s']:.0f} | "
                     f"{r['final']['val_replayed_acceptance_length']:.3f} | {at} | {r['overrides']} |")
    (out_dir / "compare.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    _plot_compare(results, sizes, out_dir / "compare.png")
    return results


def _plot_compare(results: dict, sizes: list[int], path: Path) -> None:
    """One panel per replayed block size: held-out acceptance against training minutes, per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [f"val_replayed_acceptance_at_{s}" for s in sizes] or ["val_replayed_acceptance_length"]
    fig, axes = plt.subplots(1, len(keys), figsize=(6 * len(keys), 4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for name, r in results.items():
            points = [(c["train_s"] / 60, c[key]) for c in r["curve"] if key in c]
            ax.plot(*zip(*points), marker="o", label=name)
        size = key.rsplit("_", 1)[-1] if sizes else "the training size"
        ax.set(xlabel="training minutes (this machine)", ylabel="tokens per target forward",
               title=f"Held-out replayed acceptance at block {size}")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("Drafter recipe variants from the same start: learning per CPU-minute")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
