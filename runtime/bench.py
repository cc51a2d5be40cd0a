"""`blockpilot bench`: plain decoding vs fixed block sizes, side by side in one run.

Timings on a shared 2-core machine are noisy (another process can slow a run several-fold), so
variants are interleaved (every repeat visits all of them, in a rotated order), each figure is the
median over repeats, speed ratios are taken within a repeat, and the machine-independent figures
(acceptance length, target forwards per token) are reported beside them.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path

import torch
from tqdm import tqdm

from .engine import SpeculativeEngine
from .prompts import PromptRecord, encode_prompt
from .requests import GenerationRequest
from .sampling import SamplingParams


def run_bench(engine: SpeculativeEngine, records: list[PromptRecord], block_sizes: list[int], *,
              repeats: int = 3, max_new_tokens: int = 256, batch_size: int = 1,
              sampling: SamplingParams | None = None, show_progress: bool = True, include_auto: bool = False) -> dict:
    """Run every prompt at every block size (1 = plain decoding) `repeats` times, interleaved.

    With `include_auto`, one more variant, "auto", leaves each request's size to the engine's
    block-size chooser (the policy), side by side with the fixed sizes.
    """
    variants: list[int | str] = sorted(set([1, *block_sizes]))
    for size in variants:
        engine.validate_block_size(size)
    if include_auto:
        if engine.block_size_chooser is None:
            raise ValueError("the 'auto' variant needs an engine with a block-size policy (--block-size auto)")
        variants.append("auto")
    prompts = [encode_prompt(engine.target.tokenizer, r) for r in records]
    base = sampling or SamplingParams()
    runs = {size: [] for size in variants}  # per repeat: totals
    tokens = {size: {} for size in variants}  # greedy outputs, to check the variants agree
    per_prompt = {size: {} for size in variants}
    bar = tqdm(total=repeats * len(variants) * len(prompts), desc="bench", unit="prompt", disable=not show_progress)
    for repeat in range(repeats):
        order = variants[repeat % len(variants):] + variants[: repeat % len(variants)]
        for size in order:
            totals = {"new_tokens": 0, "decode_tokens": 0, "decode_s": 0.0, "wall_s": 0.0, "target_forwards": 0}
            for start in range(0, len(prompts), batch_size):
                chunk = range(start, min(start + batch_size, len(prompts)))
                requests = [GenerationRequest(prompts[i], _with(base, max_new_tokens, repeat), records[i].id,
                                              None if size == "auto" else size) for i in chunk]
                began = time.perf_counter()
                results = engine.generate(requests)
                totals["wall_s"] += time.perf_counter() - began
                for i, result in zip(chunk, results):
                    s = result.stats
                    totals["new_tokens"] += s.generated_tokens
                    totals["decode_tokens"] += s.generated_tokens - 1
                    totals["decode_s"] += s.decode_s
                    totals["target_forwards"] += s.target_forwards
                    tokens[size].setdefault(records[i].id, result.token_ids)
                    per_prompt[size][records[i].id] = {"block_size": s.block_size, "acceptance_length": s.acceptance_length,
                                                       "target_forwards": s.target_forwards,
                                                       "generated_tokens": s.generated_tokens}
                bar.update(len(chunk))
            runs[size].append(totals)
    bar.close()
    return _summarise(engine, records, variants, runs, tokens, per_prompt, repeats, max_new_tokens, batch_size, base)


def _with(base: SamplingParams, max_new_tokens: int, repeat: int) -> SamplingParams:
    seed = None if base.greedy else (base.seed or 0) + repeat
    return SamplingParams(temperature=base.temperature, top_p=base.top_p, top_k=base.top_k, seed=seed,
                          max_new_tokens=max_new_tokens, stop=list(base.stop), ignore_eos=base.ignore_eos)


def _summarise(engine, records, variants, runs, tokens, per_prompt, repeats, max_new_tokens, batch_size, sampling) -> dict:
    def decode_tps(t):
        return t["decode_tokens"] / t["decode_s"] if t["decode_s"] > 0 else 0.0

    rows = []
    for size in variants:
        ratios = [decode_tps(t) / decode_tps(p) for t, p in zip(runs[size], runs[1]) if decode_tps(p) > 0]
        prompts = per_prompt[size].values()
        committed = sum(p["generated_tokens"] - 1 for p in prompts)
        forwards = sum(p["target_forwards"] for p in prompts)
        rows.append({
            "block_size": size,
            "acceptance_length": committed / forwards if forwards else 0.0,
            "target_forwards_per_token": forwards / committed if committed else 0.0,
            "decode_tokens_per_s": statistics.median(decode_tps(t) for t in runs[size]),
            "e2e_tokens_per_s": statistics.median(t["new_tokens"] / t["wall_s"] for t in runs[size]),
            "speedup_vs_plain": statistics.median(ratios) if ratios else 0.0,
            "decode_tokens_per_s_runs": [round(decode_tps(t), 3) for t in runs[size]],
        })
    identical = None
    if sampling.greedy:
        identical = all(tokens[size][r.id] == tokens[1][r.id] for size in variants for r in records)
    drafter = engine.drafter.config if engine.drafter else None
    return {
        "setup": {
            "model": str(engine.target.model_dir), "dtype": str(engine.target.dtype).removeprefix("torch."),
            "drafter_block_size": drafter.block_size if drafter else None,
            "drafter_layers": drafter.num_hidden_layers if drafter else None,
            "prompts": len(records), "max_new_tokens": max_new_tokens, "batch_size": batch_size,
            "repeats": repeats, "temperature": sampling.temperature, "threads": torch.get_num_threads(),
            "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        },
        "greedy_outputs_identical_across_block_sizes": identical,
        "variants": rows,
        "per_prompt": {str(size): per_prompt[size] for size in variants},
    }


def format_table(report: dict) -> str:
    setup = report["setup"]
    lines = [
        f"{setup['prompts']} prompts x {setup['max_new_tokens']} new tokens, batch {setup['batch_size']}, "
        f"{setup['repeats']} interleaved repeats (medians), {setup['dtype']}, {setup['threads']} threads, "
        f"T={setup['temperature']}",
        f"{'block':>5} {'accept len':>10} {'fwd/token':>9} {'decode tok/s':>12} {'e2e tok/s':>9} {'x plain':>7}",
    ]
    for row in report["variants"]:
        label = "plain" if row["block_size"] == 1 else str(row["block_size"])
        if row["block_size"] == "auto":
            label = "auto"
        lines.append(f"{label:>5} {row['acceptance_length']:>10.2f} {row['target_forwards_per_token']:>9.3f} "
                     f"{row['decode_tokens_per_s']:>12.2f} {row['e2e_tokens_per_s']:>9.2f} {row['speedup_vs_plain']:>7.2f}")
    if report["greedy_outputs_identical_across_block_sizes"] is not None:
        lines.append(f"greedy outputs identical across block sizes: {report['greedy_outputs_identical_across_block_sizes']}")
    return "\n".join(lines)


def save_report(report: dict, json_path: str | Path, png_path: str | Path | None = None) -> None:
    json_path = Path(json_path)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    if png_path:
        plot_report(report, png_path)


def plot_report(report: dict, png_path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["variants"] if r["block_size"] != "auto"]
    auto = [r for r in report["variants"] if r["block_size"] == "auto"]
    sizes = [r["block_size"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(sizes, [r["acceptance_length"] for r in rows], "o-", label="fixed size")
    right.plot(sizes, [r["speedup_vs_plain"] for r in rows], "o-", color="tab:green", label="fixed size")
    for row in auto:  # the policy has no single size: a level to compare the curve with
        left.axhline(row["acceptance_length"], color="tab:red", ls="--", label="auto (policy)")
        right.axhline(row["speedup_vs_plain"], color="tab:red", ls="--", label="auto (policy)")
    if auto:
        left.legend()
        right.legend()
    left.set(xlabel="block size (1 = plain decoding)", ylabel="tokens per target forward",
             title="Acceptance length")
    right.axhline(1.0, color="grey", lw=0.8, ls="--")
    right.set(xlabel="block size (1 = plain decoding)", ylabel="decode tokens/s relative to plain",
              title="Decode speed (median of interleaved repeats)")
    setup = report["setup"]
    fig.suptitle(f"{Path(setup['model']).name}, {setup['prompts']} prompts x {setup['max_new_tokens']} tokens, "
                 f"batch {setup['batch_size']}, {setup['dtype']}", fontsize=10)
    fig.tight_layout()
    Path(png_path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
