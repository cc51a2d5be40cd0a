"""`blockpilot` command line: thin argument parsing and progress bars around library calls."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from tqdm import tqdm

from .config import parse_sizes

log = logging.getLogger("blockpilot")


def _engine_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--config", help="engine settings YAML (fields of EngineConfig); flags override it")
    group.add_argument("--model", help="HF model directory of the target (default: embedded SmolLM2-135M-Instruct)")
    group.add_argument("--drafter", help="DFlash drafter directory, 'default' or 'none'")
    group.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    group.add_argument("--device", help="cpu (default), cuda (or cuda:N), or auto: a GPU where CUDA is available")
    group.add_argument("--draft-vocab", help="token ids drafts come from (a torch-saved 1-D list, SGLang's "
                                             "--speculative-token-map format), or 'full' for every token "
                                             "(default: draft_vocab.pt beside the drafter, if any)")
    group.add_argument("--max-batch-size", type=int)
    group.add_argument("--max-block-size", type=int)
    group.add_argument("--cpu-weight-layouts", type=int, choices=[1, 2],
                       help="on a CPU: 2 (default) runs each linear by the GEMM kernel measured fastest on "
                            "this machine per row count (cheap multi-token verifies); 1 torch's own F.linear")
    group = parser.add_argument_group("per-step verify")
    group.add_argument("--step-costs", help="step-cost table JSON (blockpilot step-costs --output); default "
                                            "$BLOCKPILOT_STEP_COSTS, else the one shipped with the shipped drafter")
    group.add_argument("--verify-calibration", help="drafter confidence calibration JSON (default: "
                                                    "verify_calibration.json beside the drafter)")
    group.add_argument("--draft-plan", choices=["on", "off"],
                       help="plan each step before drafting: rows whose drafts are not expected to pay at this "
                            "batch size draft less or not at all (default: on)")
    group.add_argument("--draft-sampling", choices=["sampled", "argmax"],
                       help="sampled requests' drafts: samples of the drafter's distribution, verified by "
                            "speculative sampling (default), or its argmax (SGLang DFLASH's way)")


def _sampling_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sampling")
    group.add_argument("--max-new-tokens", type=int, default=256)
    group.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    group.add_argument("--top-p", type=float, default=1.0)
    group.add_argument("--top-k", type=int, default=0)
    group.add_argument("--min-p", type=float, default=0.0)
    group.add_argument("--seed", type=int)
    group.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def _engine_config(args):
    from .config import EngineConfig

    config = EngineConfig.from_yaml(args.config) if args.config else EngineConfig()
    for name in ("model", "drafter", "draft_vocab", "dtype", "device", "max_batch_size", "max_block_size", "step_costs",
                 "verify_calibration", "cpu_weight_layouts"):
        if getattr(args, name, None) is not None:
            setattr(config, name, getattr(args, name))
    if getattr(args, "block_size", None) is not None:
        config.block_size = args.block_size
    if getattr(args, "policy", None) is not None:
        config.policy = args.policy
    if getattr(args, "verify", None) in ("auto", "full"):
        config.verify = args.verify
    if getattr(args, "draft_plan", None) is not None:
        config.draft_plan = args.draft_plan == "on"
    if getattr(args, "draft_sampling", None) in ("sampled", "argmax"):
        config.sampled_drafts = args.draft_sampling == "sampled"
    return config


def _sampling(args):
    from .sampling import SamplingParams

    return SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
                          seed=args.seed, max_new_tokens=args.max_new_tokens, stop=args.stop)


def _block_size(text: str) -> int | str:
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--block-size must be an integer or 'auto', got {text!r}") from None


# --- commands ------------------------------------------------------------------------------------
def cmd_generate(args) -> None:
    from .config import build_engine
    from .prompts import encode_prompt, read_prompts
    from .requests import GenerationRequest

    records = read_prompts(args.input)
    engine = build_engine(_engine_config(args))
    sampling = _sampling(args)
    requests = [GenerationRequest(encode_prompt(engine.target.tokenizer, r), sampling, r.id, r.block_size)
                for r in records]
    for request in requests:  # fail before any work, naming the bad prompt
        engine.validate_request(request)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=len(requests), desc="generate", unit="prompt")
    with open(output, "w") as sink:
        def write(result):
            sink.write(json.dumps(result.as_dict()) + "\n")
            sink.flush()
            bar.update(1)

        results = engine.generate(requests, on_finish=write)
    bar.close()
    tokens = sum(r.stats.generated_tokens for r in results)
    print(f"wrote {len(results)} results ({tokens} tokens) to {output}")


def cmd_bench(args) -> None:
    from .bench import format_table, run_bench, save_report
    from .config import build_engine
    from .prompts import mtbench_records, read_prompts

    records = read_prompts(args.prompts) if args.prompts else mtbench_records(limit=args.num_prompts)
    engine = build_engine(_engine_config(args))
    verify_modes = ["full", "auto"] if args.verify == "both" else [args.verify]
    report = run_bench(engine, records, args.block_sizes, repeats=args.repeats, max_new_tokens=args.max_new_tokens,
                       batch_size=args.batch_size, sampling=_sampling(args), include_auto=args.block_size == "auto",
                       verify_modes=verify_modes, compare_plan=args.compare_plan,
                       compare_draft_sampling=args.compare_draft_sampling,
                       compare_draft_vocab=args.compare_draft_vocab)
    out = Path(args.output_dir)
    save_report(report, out / "bench.json", out / "bench.png")
    print(format_table(report))
    print(f"report: {out / 'bench.json'}, plot: {out / 'bench.png'}")


def mixed_widths(spec: str) -> list[int]:
    """One batch's widths for `step-costs --mixed`: "12,16,16,20" keeps repeats; "12-20" is a range."""
    if "-" in spec:
        return parse_sizes(spec)
    try:
        return [int(w) for w in spec.split(",")]
    except ValueError:
        raise ValueError(f"--mixed batch widths must look like '12,16,16,20' or '12-20', got {spec!r}") from None


def _drafter_depth_costs(args) -> None:
    """`step-costs --drafter-layers`: what each drafter depth costs per step, and the acceptance gain
    it must bring to pay for itself."""
    from .config import build_engine
    from .step_cost import measure_drafter_depths

    if args.this_machine or args.output or args.mixed:
        raise ValueError("--drafter-layers writes a report (--report), not a table; it measures no --mixed batches")
    if args.drafter_layers[0] < 1:
        raise ValueError(f"--drafter-layers: a drafter has at least 1 layer, got {args.drafter_layers[0]}")
    engine = build_engine(_engine_config(args))
    if engine.drafter is None:
        raise ValueError("--drafter-layers measures drafters shaped as the loaded one; do not pass --drafter none")
    widths = [w for w in args.widths if w > 1]
    reports = [measure_drafter_depths(engine.target, engine.drafter, args.drafter_layers, widths,
                                      context_tokens=args.context_tokens, repeats=args.repeats, batch_size=batch)
               for batch in args.batch_sizes]
    base = args.drafter_layers[0]
    print(f"median ms per forward, KV cache of {args.context_tokens} tokens per row, {reports[0]['machine']}, "
          f"{reports[0]['threads']} threads, {reports[0]['dtype']}, {args.repeats} interleaved repeats; 'x' = the "
          f"acceptance length a drafter of that depth needs, as a multiple of the {base}-layer drafter's, to pay")
    for report in reports:
        print(f"batch {report['batch_size']}:")
        print(f"{'width':>5} {'verify':>8} " + " ".join(f"{str(d) + ' layers':>10} {'x':>6}" for d in args.drafter_layers))
        for width in widths:
            cells = " ".join(f"{report['drafter_ms'][d][width]:>10.2f} {report['step_ratio'][d][width]:>6.3f}"
                             for d in args.drafter_layers)
            print(f"{width:>5} {report['target_ms'][width]:>8.2f} {cells}")
    if args.report:
        Path(args.report).parent.mkdir(parents=True, exist_ok=True)
        Path(args.report).write_text(json.dumps(reports, indent=2) + "\n")


def cmd_step_costs(args) -> None:
    from .config import EngineConfig, build_engine
    from .step_cost import TABLE_REPEATS, measure_padding_cost, measure_step_costs

    args.repeats = args.repeats or TABLE_REPEATS
    if args.this_machine:
        if args.mixed or args.output:
            raise ValueError("--this-machine names the output itself; it measures the table, not --mixed")
        from . import assets
        from .target import resolve_device

        shipped = assets.DEFAULT_SGLANG_STEP_COSTS_PATH if args.cpu_weight_layouts == 1 else assets.DEFAULT_STEP_COSTS_PATH
        device = resolve_device(_engine_config(args).device).type  # a GPU's table is keyed by the GPU model
        args.output = str(assets.machine_step_costs_path(shipped, device))
    if args.drafter_layers:
        _drafter_depth_costs(args)
        return
    if args.mixed:
        batches = {spec: mixed_widths(spec) for spec in args.mixed}  # bad widths fail before any model loads
        engine = build_engine(_engine_config(args))
        if engine.drafter is None:
            raise ValueError("--mixed measures decode steps with a drafter; do not pass --drafter none")
        report = measure_padding_cost(engine.target, engine.drafter, batches, context_tokens=args.context_tokens,
                                      repeats=args.repeats)
        print(f"median ms per decode step (drafter + verify), KV cache of {args.context_tokens} tokens, "
              f"{report['threads']} threads, {report['dtype']}: ragged widths vs padded to the widest")
        print(f"{'batch widths':<40} {'ragged ms':>10} {'padded ms':>10} {'padded/ragged':>14}")
        for name, row in report["batches"].items():
            print(f"{name:<40} {row['ragged_ms']:>10.1f} {row['padded_ms']:>10.1f} {row['padded_over_ragged']:>14.3f}")
        if args.output:
            Path(args.output).parent.mkdir(parents=True, exist_ok=True)
            Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
        return
    tables = []  # one report per dtype and batch size
    for dtype in args.dtypes:
        config = _engine_config(args)
        config.dtype = dtype
        engine = build_engine(config)
        tables += [measure_step_costs(engine.target, engine.drafter, args.widths, context_tokens=args.context_tokens,
                                      repeats=args.repeats, batch_size=batch) for batch in args.batch_sizes]
    print(f"median ms per forward (rows x width tokens), KV cache of {args.context_tokens} tokens per row, "
          f"{tables[0]['machine']}, {tables[0]['threads']} threads")
    print(f"{'width':>5} " + " ".join(f"{t['dtype'] + ' x' + str(t['batch_size']) + ' target':>22} {'drafter':>8}"
                                      for t in tables))
    for width in args.widths:
        cells = []
        for t in tables:
            draft = t["drafter_ms"].get(width)
            cells.append(f"{t['target_ms'][width]:>22.2f} {'-' if draft is None else f'{draft:.2f}':>8}")
        print(f"{width:>5} " + " ".join(cells))
    if args.report:
        Path(args.report).parent.mkdir(parents=True, exist_ok=True)
        Path(args.report).write_text(json.dumps(tables, indent=2) + "\n")
    if args.output:
        from .step_verify import StepCostTable

        first = [t for t in tables if t["dtype"] == tables[0]["dtype"]]
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        StepCostTable.from_measurement(first).save(args.output)
        print(f"step-cost table ({first[0]['dtype']}, batch {args.batch_sizes}, SGLang SpsCostTable format + the "
              f"drafter's costs): {args.output}")


def cmd_demo(args) -> None:
    from .config import EngineConfig, build_engine
    from .prompts import encode_prompt, mtbench_records
    from .requests import GenerationRequest
    from .sampling import SamplingParams

    from . import assets

    shipped = (assets.DEFAULT_DRAFTER_DIR / "config.json").exists() and assets.DEFAULT_POLICY_PATH.exists()
    engine = build_engine(EngineConfig(block_size="auto" if shipped else None))  # the shipped policy picks sizes
    records = [r for r in mtbench_records(categories=["coding", "stem", "writing", "humanities"])][:: 10][: args.num_prompts]
    tokenizer = engine.target.tokenizer
    print(f"target: {engine.target.model_dir} ({engine.target.dtype}), drafter block size "
          f"{engine.drafter.config.block_size if engine.drafter else '-'}\n")
    first = records[0].id

    def stream(request_id, text, finished):
        if request_id == first:
            print(text, end="\n" if finished else "", flush=True)

    print(f"[{first}] {records[0].prompt}\n--- streamed answer ---")
    sampling = SamplingParams(max_new_tokens=args.max_new_tokens)
    requests = [GenerationRequest(encode_prompt(tokenizer, r), sampling, r.id) for r in records]
    results = engine.generate(requests, on_commit=stream)
    plain = engine.generate([GenerationRequest(encode_prompt(tokenizer, r), sampling, r.id, block_size=1) for r in records])
    print(f"\n{'prompt':<12} {'block':>5} {'chosen by':>9} {'tokens':>6} {'accept len':>10} {'tok/s':>7} {'plain tok/s':>11} {'same as plain':>13}")
    for result, base in zip(results, plain):
        s = result.stats
        print(f"{result.request_id:<12} {s.block_size:>5} {s.block_size_source:>9} {s.generated_tokens:>6} {s.acceptance_length:>10.2f} "
              f"{s.decode_tokens_per_s:>7.1f} {base.stats.decode_tokens_per_s:>11.1f} "
              f"{str(result.token_ids == base.token_ids):>13}")
    print(f"\n({len(records)} MT-Bench prompts, greedy, batch of {len(records)}; tokens/s here are noisy: "
          f"use `blockpilot bench` for medians of interleaved repeats)")


def cmd_train_drafter(args) -> None:
    from .training import recipe as recipes

    recipe = recipes.DrafterRecipe.from_yaml(args.config)
    if args.set:
        recipe = recipes.with_overrides(recipe, recipes.parse_variant("set:" + ",".join(args.set))[1])
    if args.stage == "compare":
        if not args.variant:
            raise SystemExit("--stage compare needs at least one --variant NAME:section.field=value,...")
        recipes.run_compare_stage(recipe, args.variant, args.minutes or 20.0)
        return
    if args.minutes and args.stage not in ("train", "data"):
        raise SystemExit("--minutes applies to --stage train and data (a time budget) and --stage compare")
    if args.stage == "bench-data":
        recipes.run_bench_data_stage(recipe)
        return
    if args.stage == "bench-train":
        recipes.run_bench_train_stage(recipe, args.steps)
        return
    stages = ["data", "train", "eval"] if args.stage == "all" else [args.stage]
    for stage in stages:
        if stage in ("train", "data"):
            getattr(recipes, f"run_{stage}_stage")(recipe, minutes=args.minutes)
        else:
            getattr(recipes, f"run_{stage}_stage")(recipe)


def cmd_policy_stage(args) -> None:
    from blockpilot.policy_export import pipeline

    from blockpilot.policy_export import verify_pipeline

    recipe = pipeline.PolicyRecipe.from_yaml(args.config)
    if getattr(args, "temperature", None) is not None:
        if args.temperature < 0:
            raise ValueError(f"--temperature must be >= 0, got {args.temperature}")
        recipe.verify.eval_temperature = args.temperature
    {"collect": pipeline.collect_stage, "train-policy": pipeline.train_stage,
     "export-policy": pipeline.export_stage, "eval-policy": pipeline.eval_stage,
     "calibrate-verify": verify_pipeline.calibrate_stage, "eval-verify": verify_pipeline.eval_stage}[args.command](recipe)


def cmd_prepare(args) -> None:
    from .assets import ensure_default_model, mtbench_questions_path

    print(f"default model: {ensure_default_model()}")
    print(f"MT-Bench questions: {mtbench_questions_path()}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="blockpilot", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("generate", help="offline batch generation over a JSONL prompt file")
    p.add_argument("--input", required=True, help='JSONL, one {"id", "prompt"} or {"id", "messages"} per line')
    p.add_argument("--output", required=True, help="JSONL of results: text, token_ids, finish_reason, stats")
    p.add_argument("--block-size", type=_block_size,
                   help="block size for every prompt (1 = plain decoding), or 'auto': the policy's choice per prompt")
    p.add_argument("--policy", help="BlockSizePolicy .onnx for --block-size auto (default: the shipped one, "
                                    "with the shipped drafter)")
    p.add_argument("--verify", choices=["auto", "full"],
                   help="auto: each step verifies only the drafts that pay (needs a step-cost table); full: every "
                        "draft (default: auto where a table is found)")
    _engine_args(p)
    _sampling_args(p)
    p.set_defaults(func=cmd_generate)

    p = commands.add_parser("bench", help="plain decoding vs every fixed block size, side by side")
    p.add_argument("--prompts", help="JSONL prompt file (default: MT-Bench first turns)")
    p.add_argument("--num-prompts", type=int, default=8, help="how many MT-Bench prompts (without --prompts)")
    p.add_argument("--block-sizes", type=parse_sizes, default=parse_sizes("2,4,8,16,24"))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--output-dir", default="runs/bench")
    p.add_argument("--block-size", type=_block_size, choices=["auto"], help="auto: add the policy as a variant")
    p.add_argument("--policy", help="policy .onnx for the auto variant (default: the shipped one)")
    p.add_argument("--verify", choices=["auto", "full", "both"], default="both",
                   help="verify rule of the speculative variants; both: each of them with full and auto verify, "
                        "side by side (auto needs a step-cost table)")
    p.add_argument("--compare-plan", action="store_true",
                   help="also run every auto-verify variant with the draft plan off ('-plan'), side by side")
    p.add_argument("--compare-draft-sampling", action="store_true",
                   help="sampled requests: also run every speculative variant with argmax drafts "
                        "('argmax drafts', SGLang DFLASH's way), side by side")
    p.add_argument("--compare-draft-vocab", action="store_true",
                   help="also run every speculative variant drafting from every token ('every token'), "
                        "beside the drafter's draft vocabulary")
    _engine_args(p)
    _sampling_args(p)
    p.set_defaults(func=cmd_bench)

    p = commands.add_parser("step-costs", help="ms per target / drafter forward for each block width")
    p.add_argument("--widths", type=parse_sizes, default=parse_sizes("1-10,12,16,24,32,48,64"))
    p.add_argument("--dtypes", nargs="+", default=["float32"], choices=["float32", "bfloat16"])
    p.add_argument("--batch-sizes", type=parse_sizes, default=[1],
                   help="rows per step, e.g. 1,2,4,8,16,32: the table's probes are rows x width tokens")
    p.add_argument("--context-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, help="interleaved repeats per width (default: step_cost.TABLE_REPEATS)")
    p.add_argument("--output", help="write the step-cost table the per-step verify rule reads (first dtype) here "
                                    "(with --mixed: the padding report)")
    p.add_argument("--report", help="write every dtype's raw milliseconds per width as JSON here")
    p.add_argument("--this-machine", action="store_true",
                   help="write the table where the engine and the SGLang plugin look for this machine's own\n"
                        "(the cache folder, by CPU model, or GPU model with --device cuda; --cpu-weight-layouts 1: "
                        "the table the plugin reads)")
    _engine_args(p)
    p.add_argument("--drafter-layers", type=parse_sizes,
                   help="instead: the drafter's forward at these depths (e.g. 2-5; fresh drafters shaped as the "
                        "loaded one) beside the verify, and the acceptance gain each depth must bring to pay")
    p.add_argument("--mixed", nargs="+", metavar="WIDTHS",
                   help="instead: mixed-width batches (e.g. 12,16,20,20 or 12-20), ragged vs padded to the widest")
    p.set_defaults(func=cmd_step_costs)

    p = commands.add_parser("demo", help="a few real prompts with speculation, and what it achieved")
    p.add_argument("--num-prompts", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.set_defaults(func=cmd_demo)

    p = commands.add_parser("train-drafter", help="train a DFlash drafter for a target (resumable stages)")
    p.add_argument("--config", required=True, help="recipe YAML, e.g. configs/drafter-smollm2.yaml")
    p.add_argument("--stage", choices=["data", "train", "eval", "ship", "all", "compare", "bench-data", "bench-train"],
                   default="all",
                   help="compare: train each --variant for --minutes on the same data, side by side; "
                        "bench-data: print the data stage's generated tokens/s; "
                        "bench-train: print training's supervised positions/s (synthetic data); "
                        "ship: copy the evaluated candidate into the default drafter's asset folder")
    p.add_argument("--steps", type=int, default=20, help="bench-train: steps timed, after 3 warm-up steps")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override a recipe setting, e.g. --set data.batch_size=8 (repeatable)")
    p.add_argument("--variant", action="append", default=[],
                   help='compare stage: "NAME:train.soft_target_weight=0.7,drafter.block_size=4" (repeatable)')
    p.add_argument("--minutes", type=float, default=None,
                   help="train stage: stop (checkpointed, drafter saved) after this much more training time; "
                        "data stage: stop adding responses after this long; "
                        "compare stage: training minutes per variant (default 20)")
    p.set_defaults(func=cmd_train_drafter)

    for name, text in (("collect", "run prompts at every candidate block size; record counts and prefill features"),
                       ("train-policy", "train the block-size policy on oracle labels (every objective)"),
                       ("export-policy", "export the better policy to ONNX with metadata; check it against PyTorch"),
                       ("eval-policy", "held-out comparison: fixed sizes, policy, oracle, random, constant"),
                       ("calibrate-verify", "fit the drafter's confidence calibration for the per-step verify rule"),
                       ("eval-verify", "held-out comparison of verify rules: fixed sizes x {full, rule}, policy, oracle")):
        p = commands.add_parser(name, help=text)
        p.add_argument("--config", required=True, help="policy recipe YAML, e.g. configs/policy-smollm2.yaml")
        if name == "eval-verify":
            p.add_argument("--temperature", type=float,
                           help="replay the target's answers sampled at this temperature (default: the recipe's "
                                "verify.eval_temperature, 0 = greedy)")
        p.set_defaults(func=cmd_policy_stage)

    p = commands.add_parser("prepare", help="download and convert the embedded default model (idempotent)")
    p.set_defaults(func=cmd_prepare)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        args.func(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"blockpilot {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
