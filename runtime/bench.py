"""`blockpilot bench`: plain decoding vs fixed block sizes, side by side in one run.

Timings on a shared 2-core machine are noisy (another process can slow a run several-fold, and a
machine's speed can drift within minutes), so variants are interleaved prompt by prompt (every
variant runs a prompt before the next prompt starts, in orders balanced for place and predecessor), each
figure is the median over repeats, speed ratios are taken within a repeat, and the
machine-independent figures (acceptance length, target forwards per token) are reported beside them.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path
from typing import NamedTuple

import torch
from tqdm import tqdm

from .assets import device_name
from .engine import SpeculativeEngine
from .prompts import PromptRecord, encode_prompt
from .requests import GenerationRequest
from .sampling import SamplingParams
from .step_verify import VerifyMode


class Variant(NamedTuple):
    size: int | str  # "auto": the policy's choice per request
    verify: str  # "full" or "auto"
    plan: bool  # the draft plan on
    sampled_drafts: bool = True  # sampled requests draft from the drafter's distribution
    every_token: bool = False  # drafts from every token, not the drafter's draft vocabulary


def variant_name(variant: Variant) -> str:
    if variant.size == 1:
        return "plain"
    name = str(variant.size)
    if variant.verify == "auto":
        name += " +verify" if variant.plan else " +verify -plan"
    name = name if variant.sampled_drafts else name + " argmax drafts"
    return name + " every token" if variant.every_token else name


def run_bench(engine: SpeculativeEngine, records: list[PromptRecord], block_sizes: list[int], *,
              repeats: int = 3, max_new_tokens: int = 256, batch_size: int = 1,
              sampling: SamplingParams | None = None, show_progress: bool = True, include_auto: bool = False,
              verify_modes: list[str] = ("full",), compare_plan: bool = False,
              compare_draft_sampling: bool = False, compare_draft_vocab: bool = False) -> dict:
    """Run every prompt at every block size (1 = plain decoding) `repeats` times, interleaved.

    With `include_auto`, one more block size, "auto", leaves each request's size to the engine's
    block-size chooser (the policy). Every speculative size runs once per verify mode in
    `verify_modes` ("full": every draft verified; "auto": the per-step verify rule), side by side;
    "auto" is skipped, with a note, when the engine has no step-cost table. With `compare_plan`,
    every "auto" variant also runs with the draft plan off (`VerifyRule.draft_plan`, "-plan"). With
    `compare_draft_sampling` (sampled requests), every speculative variant also runs with argmax drafts.
    With `compare_draft_vocab` (a drafter with a draft vocabulary), every speculative variant also
    drafts from every token ("every token").
    """
    sizes: list[int | str] = sorted(set([1, *block_sizes]))
    for size in sizes:
        engine.validate_block_size(size)
    if include_auto:
        if engine.block_size_chooser is None:
            raise ValueError("the 'auto' variant needs an engine with a block-size policy (--block-size auto)")
        sizes.append("auto")
    modes = [VerifyMode.parse(m, "bench verify mode") for m in verify_modes]
    if VerifyMode.AUTO in modes and not engine.verify_rule.can_choose:
        print("bench: no step-cost table, so no '+verify' variants (blockpilot step-costs --output FILE)")
        modes = [m for m in modes if m is not VerifyMode.AUTO] or [VerifyMode.FULL]
    rule = engine.verify_rule
    plans = {VerifyMode.FULL: [rule.draft_plan],
             VerifyMode.AUTO: [rule.draft_plan, not rule.draft_plan] if compare_plan else [rule.draft_plan]}
    draft_sampling = [engine.sampled_drafts, False] if compare_draft_sampling and engine.sampled_drafts else [
        engine.sampled_drafts]
    vocabulary = engine.drafter.vocabulary if engine.drafter is not None else None
    if compare_draft_vocab and vocabulary is None:
        print("bench: the drafter drafts from every token already, so no 'every token' variants")
    vocabularies = [False, True] if compare_draft_vocab and vocabulary is not None else [False]
    variants: list[Variant] = [Variant(1, "full", rule.draft_plan, engine.sampled_drafts)] + [
        Variant(size, mode.value, plan, sampled, every_token) for size in sizes if size != 1 for mode in modes
        for plan in plans[mode] for sampled in draft_sampling for every_token in vocabularies]
    own_sampling = engine.sampled_drafts
    prompts = [encode_prompt(engine.target.tokenizer, r) for r in records]
    base = sampling or SamplingParams()
    runs = {v: [] for v in variants}  # per repeat: totals
    tokens = {v: {} for v in variants}  # greedy outputs, to check the variants agree
    per_prompt = {v: {} for v in variants}
    bar = tqdm(total=repeats * len(variants) * len(prompts), desc="bench", unit="prompt", disable=not show_progress)
    chunks = [range(start, min(start + batch_size, len(prompts))) for start in range(0, len(prompts), batch_size)]
    orders = balanced_orders(len(variants))
    try:
        for repeat in range(repeats):
            totals = {v: {"new_tokens": 0, "decode_tokens": 0, "decode_s": 0.0, "wall_s": 0.0, "target_forwards": 0,
                          "drafted": 0, "verified": 0} for v in variants}
            # Every variant runs each prompt (or batch) before the next one starts: a machine that slows
            # down for a minute slows every variant alike, where one variant's whole pass in a row would
            # take the slowdown alone. The orders take turns so that no variant always runs first or
            # always after the same other one (what the one before leaves in caches and memory).
            for number, chunk in enumerate(chunks):
                for index in orders[(repeat * len(chunks) + number) % len(orders)]:
                    variant = variants[index]
                    size, verify, plan, engine.sampled_drafts, every_token = variant
                    rule.draft_plan = plan
                    if engine.drafter is not None:
                        engine.drafter.vocabulary = None if every_token else vocabulary
                    requests = [GenerationRequest(prompts[i], _with(base, max_new_tokens, repeat), records[i].id,
                                                  None if size == "auto" else size, verify=VerifyMode(verify))
                                for i in chunk]
                    began = time.perf_counter()
                    results = engine.generate(requests)
                    total = totals[variant]
                    total["wall_s"] += time.perf_counter() - began
                    for i, result in zip(chunk, results):
                        s = result.stats
                        total["new_tokens"] += s.generated_tokens
                        total["decode_tokens"] += s.generated_tokens - 1
                        total["decode_s"] += s.decode_s
                        total["target_forwards"] += s.target_forwards
                        total["drafted"] += s.drafted_tokens
                        total["verified"] += s.verified_drafts
                        tokens[variant].setdefault(records[i].id, result.token_ids)
                        per_prompt[variant][records[i].id] = {
                            "block_size": s.block_size, "acceptance_length": s.acceptance_length,
                            "target_forwards": s.target_forwards, "generated_tokens": s.generated_tokens,
                            "drafted_tokens": s.drafted_tokens, "verified_drafts": s.verified_drafts,
                            "drafter_skipped_steps": s.drafter_skipped_steps}
                    bar.update(len(chunk))
            for variant in variants:
                runs[variant].append(totals[variant])
    finally:
        rule.draft_plan = plans[VerifyMode.FULL][0]  # the engine's own settings again, whatever happened
        engine.sampled_drafts = own_sampling
        if engine.drafter is not None:
            engine.drafter.vocabulary = vocabulary
    bar.close()
    return _summarise(engine, records, variants, runs, tokens, per_prompt, repeats, max_new_tokens, batch_size, base)


def balanced_orders(n: int) -> list[list[int]]:
    """Orders of n variants in which each variant stands at each place equally often and follows
    each other variant equally often (a Williams design: n orders for even n, 2n for odd n)."""
    first = [0]
    for k in range(1, n):
        first.append((k + 1) // 2 if k % 2 else n - k // 2)
    orders = [[(v + shift) % n for v in first] for shift in range(n)]
    return orders if n % 2 == 0 else orders + [order[::-1] for order in orders]


def _with(base: SamplingParams, max_new_tokens: int, repeat: int) -> SamplingParams:
    seed = None if base.greedy else (base.seed or 0) + repeat
    return SamplingParams(temperature=base.temperature, top_p=base.top_p, top_k=base.top_k, min_p=base.min_p, seed=seed,
                          max_new_tokens=max_new_tokens, stop=list(base.stop), ignore_eos=base.ignore_eos)


def _summarise(engine, records, variants, runs, tokens, per_prompt, repeats, max_new_tokens, batch_size, sampling) -> dict:
    def decode_tps(t):
        return t["decode_tokens"] / t["decode_s"] if t["decode_s"] > 0 else 0.0

    plain = variants[0]
    rows = []
    for variant in variants:
        ratios = [decode_tps(t) / decode_tps(p) for t, p in zip(runs[variant], runs[plain]) if decode_tps(p) > 0]
        prompts = per_prompt[variant].values()
        committed = sum(p["generated_tokens"] - 1 for p in prompts)
        forwards = sum(p["target_forwards"] for p in prompts)
        last = runs[variant][-1]
        rows.append({
            "name": variant_name(variant),
            "block_size": variant[0],
            "verify": variant[1],
            "draft_plan": variant[2] if variant[1] == "auto" else None,
            "sampled_drafts": variant.sampled_drafts,
            "draft_vocab": None if variant.size == 1 else "every token" if variant.every_token else (
                len(engine.drafter.vocabulary) if engine.drafter is not None and engine.drafter.vocabulary is not None
                else "every token"),
            "acceptance_length": committed / forwards if forwards else 0.0,
            "target_forwards_per_token": forwards / committed if committed else 0.0,
            "drafted_per_step": last["drafted"] / last["target_forwards"] if last["target_forwards"] else 0.0,
            "verified_per_step": last["verified"] / last["target_forwards"] if last["target_forwards"] else 0.0,
            "decode_tokens_per_s": statistics.median(decode_tps(t) for t in runs[variant]),
            "e2e_tokens_per_s": statistics.median(t["new_tokens"] / t["wall_s"] for t in runs[variant]),
            "speedup_vs_plain": statistics.median(ratios) if ratios else 0.0,
            "speedup_vs_plain_runs": [round(r, 4) for r in ratios],  # one per repeat: the spread to read
            "decode_tokens_per_s_runs": [round(decode_tps(t), 3) for t in runs[variant]],
        })
    identical = None
    if sampling.greedy:
        identical = all(tokens[v][r.id] == tokens[plain][r.id] for v in variants for r in records)
    drafter = engine.drafter.config if engine.drafter else None
    costs = engine.verify_rule.costs
    return {
        "setup": {
            "model": str(engine.target.model_dir), "dtype": str(engine.target.dtype).removeprefix("torch."),
            "drafter_block_size": drafter.block_size if drafter else None,
            "drafter_layers": drafter.num_hidden_layers if drafter else None,
            "prompts": len(records), "max_new_tokens": max_new_tokens, "batch_size": batch_size,
            "repeats": repeats, "temperature": sampling.temperature, "threads": torch.get_num_threads(),
            "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
            "device": device_name(engine.target.device.type),
            "step_costs": costs.source if costs else None,
            "verify_calibration": engine.verify_rule.calibration.source if engine.verify_rule.calibration else None,
        },
        "greedy_outputs_identical_across_block_sizes": identical,
        "variants": rows,
        "per_prompt": {variant_name(v): per_prompt[v] for v in variants},
    }


def format_table(report: dict) -> str:
    setup = report["setup"]
    lines = [
        f"{setup['prompts']} prompts x {setup['max_new_tokens']} new tokens, batch {setup['batch_size']}, "
        f"{setup['repeats']} interleaved repeats (medians), {setup['dtype']}, {setup.get('device', 'cpu')}, "
        f"{setup['threads']} threads, T={setup['temperature']}",
        f"{'variant':>15} {'accept len':>10} {'drafted/step':>12} {'verified/step':>13} {'decode tok/s':>12} "
        f"{'e2e tok/s':>9} {'x plain':>7} {'per repeat':>10}",
    ]
    for row in report["variants"]:
        runs = row.get("speedup_vs_plain_runs", [])
        spread = f"{min(runs):.2f}-{max(runs):.2f}" if len(runs) > 1 else ""
        lines.append(f"{row['name']:>15} {row['acceptance_length']:>10.2f} {row['drafted_per_step']:>12.2f} "
                     f"{row['verified_per_step']:>13.2f} {row['decode_tokens_per_s']:>12.2f} "
                     f"{row['e2e_tokens_per_s']:>9.2f} {row['speedup_vs_plain']:>7.2f} {spread:>10}")
    if report["greedy_outputs_identical_across_block_sizes"] is not None:
        lines.append(f"greedy outputs identical across variants: {report['greedy_outputs_identical_across_block_sizes']}")
    return "\n".join(lines)


def save_report(report: dict, json_path: str | Path, png_path: str | Path | None = None) -> None:
    json_path = Path(json_path)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    if png_path:
        plot_report(report, png_path)


def plot_report(report: dict, png_path: str | Path) -> None:
    """Decode speed relative to plain decoding, one bar per variant (full verify and +verify side by side)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["variants"]
    colours = ["grey" if r["block_size"] == 1 else "tab:green" if r["verify"] == "auto" else "tab:blue" for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 0.45 * len(rows) + 1.8))
    names = [r["name"] for r in rows][::-1]
    left.barh(names, [r["acceptance_length"] for r in rows][::-1], color=colours[::-1])
    left.set(xlabel="tokens per target forward", title="Acceptance length")
    right.barh(names, [r["speedup_vs_plain"] for r in rows][::-1], color=colours[::-1])
    for y, r in enumerate(rows[::-1]):  # each repeat's own ratio: how far one run is from another
        runs = r.get("speedup_vs_plain_runs", [])
        right.plot(runs, [y] * len(runs), "k|", ms=10)
    right.axvline(1.0, color="grey", lw=0.8, ls="--")
    right.set(xlabel="decode tokens/s relative to plain (bars: median of interleaved repeats; ticks: each repeat)",
              title="Decode speed (green: +verify, the per-step verify rule)")
    setup = report["setup"]
    fig.suptitle(f"{Path(setup['model']).name}, {setup['prompts']} prompts x {setup['max_new_tokens']} tokens, "
                 f"batch {setup['batch_size']}, {setup['dtype']}, {setup.get('device', 'cpu')}", fontsize=10)
    fig.tight_layout()
    Path(png_path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
