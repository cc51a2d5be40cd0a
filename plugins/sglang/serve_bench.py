"""Serving benchmark: a BlockPilot SGLang server against SGLang without speculation, same model,
same flags, same prompts, measured side by side in one run.

    python -m blockpilot.plugins.sglang.serve_bench --concurrency 1 8 16 --variants policy mixed dflash
    make serve-bench                                       # the same, from the repo (SGLang's venv)

Both servers run at once (each sleeps while idle). For every concurrency level the same MT-Bench
first turns (greedy) go to the plain server and to the BlockPilot server once per variant, the
order alternating between repeats, each request streamed so its time to first token is seen:

* ``policy``: no block size: the shipped policy picks each request's size, the server's verify
  mode (``auto`` with the shipped step-cost table: the per-step verify rule);
* ``mixed``: requests cycle through block sizes 1, 2, 3, 6, "auto" and none (the policy), the mix a
  server that lets clients choose sees (6: the widest the default server takes with the shipped
  drafter, whose range is 2 to max(its block size 4, the policy's candidates));
* ``dflash``: every request at the drafter's training size with every draft verified (what SGLang's
  DFLASH does);
* ``fixed-N``: every request at size N; ``fixed-N-full``: the same with every draft verified.

Printed per level and variant (medians over repeats): output tokens/s, time to first token and
time per output token (medians over requests), the ratio to the plain server's tokens/s, accept
length, verified drafts per verify, and how many outputs equal the plain server's token for token.
Written: ``serve_bench.json`` and ``serve_bench.png`` in ``--output-dir``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

from .local_server import LocalServer

MIXED_SIZES = [1, 2, 3, 6, "auto", None]  # None: the policy decides
WARMUP_NEW_TOKENS = 32  # per warm-up request: enough decode steps for the step-time correction to settle


@dataclass
class RequestResult:
    prompt: int
    ttft_s: float
    latency_s: float
    output_ids: list[int]
    meta: dict = field(repr=False)

    @property
    def tokens(self) -> int:
        return len(self.output_ids)

    @property
    def time_per_output_token_s(self) -> Optional[float]:
        return (self.latency_s - self.ttft_s) / (self.tokens - 1) if self.tokens > 1 else None


@dataclass
class LevelRun:
    """One variant's pass over one level's prompts."""
    variant: str
    concurrency: int
    repeat: int
    wall_s: float
    output_tokens: int
    median_ttft_s: float
    median_tpot_s: Optional[float]
    accept_length: Optional[float]  # committed tokens per target verify, over the run's requests
    verified_per_verify: Optional[float]  # drafts the target verified per verify (BlockPilot's meta_info)
    identical_to_plain: Optional[int] = None
    outputs: list[list[int]] = field(default_factory=list, repr=False)
    started_at: Optional[float] = None  # wall-clock seconds: lines the run up with BLOCKPILOT_STEP_LOG's steps

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.wall_s


def variant_params(name: str, trained_size: int) -> Callable[[int], Optional[dict]]:
    """What a variant sends as ``custom_params`` for its i-th request (None: nothing)."""
    if name in ("plain", "policy"):
        return lambda i: None
    if name == "mixed":
        return lambda i: (None if MIXED_SIZES[i % len(MIXED_SIZES)] is None
                          else {"blockpilot_block_size": MIXED_SIZES[i % len(MIXED_SIZES)]})
    if name == "dflash":
        return lambda i: {"blockpilot_block_size": trained_size, "blockpilot_verify": "full"}
    if name.startswith("fixed-"):
        parts = name.split("-")
        try:
            size = int(parts[1])
        except (IndexError, ValueError):
            size = None
        if size is not None and len(parts) == 2:
            return lambda i: {"blockpilot_block_size": size}
        if size is not None and parts[2:] == ["full"]:
            return lambda i: {"blockpilot_block_size": size, "blockpilot_verify": "full"}
    raise ValueError(f"unknown variant {name!r}: policy, mixed, dflash, fixed-N or fixed-N-full")


def one_request(server: LocalServer, index: int, prompt: list[int], max_new_tokens: int,
                custom: Optional[dict]) -> RequestResult:
    params = {"temperature": 0, "max_new_tokens": max_new_tokens}
    if custom:
        params["custom_params"] = custom
    start = time.perf_counter()
    first, last, pieces = None, None, []
    for chunk in server.stream_chunks({"input_ids": prompt, "sampling_params": params}):
        if first is None:
            first = time.perf_counter()
        pieces.append(chunk.get("output_ids") or [])
        last = chunk
    end = time.perf_counter()
    if last is None:
        raise RuntimeError(f"request {index}: the server streamed nothing")
    meta = last.get("meta_info", {})
    # SGLang streams output_ids either cumulatively or as increments; completion_tokens says which.
    ids = pieces[-1] if len(pieces[-1]) == meta.get("completion_tokens") else [t for p in pieces for t in p]
    return RequestResult(index, first - start, end - start, ids, meta)


def run_level(server: LocalServer, variant: str, prompts: list[list[int]], concurrency: int, repeat: int,
              max_new_tokens: int, params: Callable[[int], Optional[dict]]) -> LevelRun:
    started_at, start = time.time(), time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        results = list(pool.map(lambda i: one_request(server, i, prompts[i], max_new_tokens, params(i)),
                                range(len(prompts))))
    wall = time.perf_counter() - start
    verifies = sum(r.meta.get("spec_verify_ct") or 0 for r in results)
    verified = [r.meta.get("blockpilot_verified_drafts") for r in results]
    tpots = [t for t in (r.time_per_output_token_s for r in results) if t is not None]
    return LevelRun(
        variant=variant, concurrency=concurrency, repeat=repeat, wall_s=wall,
        output_tokens=sum(r.tokens for r in results),
        median_ttft_s=statistics.median(r.ttft_s for r in results),
        median_tpot_s=statistics.median(tpots) if tpots else None,
        accept_length=sum(r.tokens for r in results) / verifies if verifies else None,
        verified_per_verify=(sum(verified) / verifies if verifies and None not in verified else None),
        outputs=[r.output_ids for r in results], started_at=round(started_at, 3))


def median_of(runs: list[LevelRun], key: Callable[[LevelRun], Optional[float]]) -> Optional[float]:
    values = [key(run) for run in runs if key(run) is not None]
    return statistics.median(values) if values else None


def summarise(runs: list[LevelRun], variants: list[str], levels: list[int]) -> list[dict]:
    rows = []
    for level in levels:
        plain = median_of([r for r in runs if r.concurrency == level and r.variant == "plain"], lambda r: r.tokens_per_s)
        for variant in ["plain", *variants]:
            mine = [r for r in runs if r.concurrency == level and r.variant == variant]
            tps = median_of(mine, lambda r: r.tokens_per_s)
            rows.append(dict(
                concurrency=level, variant=variant, requests=len(mine[0].outputs), repeats=len(mine),
                output_tokens_per_s=tps, x_plain=tps / plain if plain else None,
                median_ttft_ms=1e3 * median_of(mine, lambda r: r.median_ttft_s),
                median_tpot_ms=(1e3 * median_of(mine, lambda r: r.median_tpot_s)
                                if median_of(mine, lambda r: r.median_tpot_s) is not None else None),
                accept_length=median_of(mine, lambda r: r.accept_length),
                verified_per_verify=median_of(mine, lambda r: r.verified_per_verify),
                identical_to_plain=(None if variant == "plain" else
                                    f"{min(r.identical_to_plain for r in mine)}/{len(mine[0].outputs)}")))
    return rows


def format_table(rows: list[dict]) -> str:
    head = ("conc", "variant", "req", "tok/s", "x plain", "TTFT ms", "TPOT ms", "accept len", "verified/verify",
            "= plain")
    lines = ["  ".join(f"{h:>15}" if i > 1 else f"{h:>5}" if i == 0 else f"{h:<14}" for i, h in enumerate(head))]

    def fmt(value, spec):
        return "-" if value is None else format(value, spec)

    for row in rows:
        cells = [f"{row['concurrency']:>5}", f"{row['variant']:<14}", f"{row['requests']:>15}",
                 f"{fmt(row['output_tokens_per_s'], '.2f'):>15}", f"{fmt(row['x_plain'], '.3f'):>15}",
                 f"{fmt(row['median_ttft_ms'], '.0f'):>15}", f"{fmt(row['median_tpot_ms'], '.1f'):>15}",
                 f"{fmt(row['accept_length'], '.3f'):>15}", f"{fmt(row['verified_per_verify'], '.2f'):>15}",
                 f"{row['identical_to_plain'] or '-':>15}"]
        lines.append("  ".join(cells))
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(dict.fromkeys(r["variant"] for r in rows))
    levels = sorted({r["concurrency"] for r in rows})
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(variants)
    for k, variant in enumerate(variants):
        values = [next(r["output_tokens_per_s"] for r in rows if r["variant"] == variant and r["concurrency"] == c)
                  for c in levels]
        ax.bar([i + k * width for i in range(len(levels))], values, width, label=variant)
    ax.set_xticks([i + width * (len(variants) - 1) / 2 for i in range(len(levels))])
    ax.set_xticklabels([f"concurrency {c}" for c in levels])
    ax.set_ylabel("output tokens/s (median)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 16])
    parser.add_argument("--variants", nargs="+", default=["policy", "mixed", "dflash"],
                        help="policy, mixed, dflash, fixed-N, fixed-N-full (the plain server always runs)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="requests per level = rounds x concurrency (at least --min-requests)")
    parser.add_argument("--min-requests", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=1, help="interleaved passes per level (order alternates)")
    parser.add_argument("--warmup-requests", type=int, default=2,
                        help="unmeasured requests per variant before the first level, from the last MT-Bench turns\n"
                             "(never measured): first-call costs and the plan's step-time correction settle")
    parser.add_argument("--model", default=None, help="target HF directory (default: the default model)")
    parser.add_argument("--drafter", default=None, help="DFlash drafter directory (default: the shipped one)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--env", nargs="*", default=[], metavar="NAME=VALUE",
                        help="BLOCKPILOT_* settings for the BlockPilot server (e.g. BLOCKPILOT_VERIFY=full)")
    # Two servers side by side: the second one's static memory share is taken of what the first left
    # (SGLang refuses 0.05 there); --max-total-tokens still bounds the KV cache.
    parser.add_argument("--server-args", default="--mem-fraction-static 0.1",
                        help="extra sglang.launch_server flags for both servers (default: %(default)s)")
    parser.add_argument("--output-dir", type=Path, default=Path("runs/serve-bench"))
    args = parser.parse_args(argv)

    from blockpilot.runtime import assets
    from blockpilot.runtime.drafter import DFlashConfig
    from blockpilot.runtime.prompts import encode_prompt, mtbench_records
    from transformers import AutoTokenizer

    model = args.model or str(assets.ensure_default_model())
    drafter = args.drafter or str(assets.DEFAULT_DRAFTER_DIR)
    config_path = Path(drafter) / "config.json"
    if not config_path.is_file():
        parser.error(f"no DFlash drafter at {drafter}: {config_path} does not exist")
    trained_size = int(DFlashConfig.from_json_dict(json.loads(config_path.read_text()), str(config_path)).block_size)
    params = {name: variant_params(name, trained_size) for name in args.variants}  # refuses a bad name early
    env = dict(item.split("=", 1) for item in args.env)
    unknown = [name for name in env if not name.startswith("BLOCKPILOT_")]
    if unknown:
        parser.error(f"--env takes BLOCKPILOT_* settings only, got {', '.join(unknown)}")

    tokenizer = AutoTokenizer.from_pretrained(model)
    records = mtbench_records()
    args.output_dir.mkdir(parents=True, exist_ok=True)
    extra = args.server_args.split()
    print(f"model {model}\ndrafter {drafter} (trained at block {trained_size})\nBlockPilot env {env or 'defaults'}",
          flush=True)
    with LocalServer(args.output_dir / "plain.log", extra, model=model, device=args.device) as plain, \
            LocalServer(args.output_dir / "blockpilot.log",
                        ["--speculative-algorithm", "blockpilot", "--speculative-draft-model-path", drafter, *extra],
                        env=env, model=model, device=args.device) as blockpilot:
        started = [plain.wait_ready(), blockpilot.wait_ready()]
        print(f"servers ready ({started[0]:.0f} s, {started[1]:.0f} s)", flush=True)
        if args.warmup_requests > 0:
            warmup = [encode_prompt(tokenizer, r) for r in records[-args.warmup_requests:]]
            for variant in ["plain", *args.variants]:
                run_level(plain if variant == "plain" else blockpilot, variant, warmup, 1, -1, WARMUP_NEW_TOKENS,
                          variant_params("plain", trained_size) if variant == "plain" else params[variant])
            print(f"warmed up: {len(warmup)} requests x {WARMUP_NEW_TOKENS} tokens per variant", flush=True)
        runs: list[LevelRun] = []
        for level in args.concurrency:
            count = max(args.rounds * level, args.min_requests)
            prompts = [encode_prompt(tokenizer, records[i % len(records)]) for i in range(count)]
            for repeat in range(args.repeats):
                order = ["plain", *args.variants]
                for variant in (order if repeat % 2 == 0 else order[::-1]):
                    server = plain if variant == "plain" else blockpilot
                    run = run_level(server, variant, prompts, level, repeat, args.max_new_tokens,
                                    variant_params("plain", trained_size) if variant == "plain" else params[variant])
                    runs.append(run)
                    print(f"concurrency {level:>3}  {variant:<14} repeat {repeat}: {run.tokens_per_s:7.2f} output tok/s "
                          f"({run.output_tokens} tokens in {run.wall_s:.1f} s)", flush=True)
                plain_outputs = next(r.outputs for r in runs
                                     if r.concurrency == level and r.repeat == repeat and r.variant == "plain")
                for run in runs:
                    if run.concurrency == level and run.repeat == repeat and run.variant != "plain":
                        run.identical_to_plain = sum(a == b for a, b in zip(run.outputs, plain_outputs))

    rows = summarise(runs, args.variants, args.concurrency)
    setup = (f"MT-Bench first turns, greedy, {args.max_new_tokens} new tokens, {args.device}, "
             f"rounds {args.rounds}, repeats {args.repeats}; BlockPilot env {env or 'defaults'}")
    table = format_table(rows)
    print(f"\n{setup}\n{table}")
    (args.output_dir / "serve_bench.json").write_text(json.dumps(
        {"setup": setup, "model": model, "drafter": drafter, "env": env, "rows": rows,
         "runs": [{k: v for k, v in asdict(r).items() if k != "outputs"} for r in runs]}, indent=1))
    (args.output_dir / "serve_bench.txt").write_text(f"{setup}\n{table}\n")
    plot(rows, args.output_dir / "serve_bench.png", setup)
    print(f"wrote {args.output_dir}/serve_bench.{{json,txt,png}}")


if __name__ == "__main__":
    main()
