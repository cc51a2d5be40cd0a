"""What one decode step costs, per block size: a target forward over W tokens and a drafter forward
over a W-wide block, each with a realistic KV cache behind it.

These costs decide which block sizes can ever pay on a machine, and turn machine-independent
counts (target forwards per token) into tokens per second (`step_ms`); the policy's labels built
from them live with the policy (`policy_export/collect.py`).
"""

from __future__ import annotations

import statistics
import time

import torch

from . import blocks
from .assets import device_name
from .cpu_linear import MeasuredLinear
from .draft_vocab import drafts_from
from .drafter import DFlashDraftModel
from .engine import propose_drafts
from .target import TargetModel


# Repeats behind a step-cost table the rule reads: its entries are medians, and single forwards on a
# shared 2-core machine move by tens of percent.
TABLE_REPEATS = 21


def weight_layouts(target: TargetModel) -> int:
    """How the target's linears ran (the table's `cpu_weight_layouts`, a name kept from when the choice
    was between two weight layouts): 2 with `cpu_linear.MeasuredLinear`, the kernel measured fastest per
    row count (the engine on a CPU), else 1, torch's own `F.linear` (as a server without speculation)."""
    return 2 if any(isinstance(m, MeasuredLinear) for m in target.hf_model.modules()) else 1


def wait_for(device: torch.device) -> None:
    """Wait for the kernels queued on `device`: a GPU returns from a forward once it is launched, so a
    timer stopped before this measures the launch, not the step."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def filled_caches(target: TargetModel, drafters: list[DFlashDraftModel], rows: int, context_tokens: int,
                  max_width: int, generator: torch.Generator):
    """A target KV cache of `rows` slots, each already holding `context_tokens` of context (random
    token ids: fine for timing), with room for one more block of `max_width`, and one cache per drafter
    with that context written (one target prefill: the drafters read the same target features)."""
    capacity = context_tokens + max_width + 1
    context = torch.randint(0, target.vocab_size, (rows * context_tokens,), generator=generator)
    capture = tuple(drafters[0].config.target_layer_ids) if drafters else ()
    run = target.prefill(list(context.view(rows, context_tokens)), capture, capacity=capacity)
    draft_caches = []
    for drafter in drafters:
        draft_caches.append(drafter.new_cache(rows, capacity))
        drafter.write_context(run.features, run.layout.row, run.layout.positions, draft_caches[-1])
    return run.cache, draft_caches


def _timed_forwards(target: TargetModel, drafters: list[DFlashDraftModel], widths: list[int], context_tokens: int,
                    repeats: int, batch_size: int) -> tuple[dict, list[dict]]:
    """Median milliseconds of the target's verify per width (`batch_size` rows that wide) and of each
    drafter's forward over the same block (widths > 1), interleaved over repeats; each drafter takes
    its turn first after the verify (the first forward after it runs slower). On the target's device,
    timed to the end of its kernels. The drafters read the same target layers."""
    generator = torch.Generator().manual_seed(0)
    device = target.device
    capture = tuple(drafters[0].config.target_layer_ids) if drafters else ()
    target_cache, draft_caches = filled_caches(target, drafters, batch_size, context_tokens, max(widths), generator)
    target_ms = {w: [] for w in widths}
    draft_ms = [{w: [] for w in widths if w > 1} for _ in drafters]
    for repeat in range(repeats):
        turn = repeat % len(drafters) if drafters else 0
        order = list(range(len(drafters)))[turn:] + list(range(len(drafters)))[:turn]
        for width in widths:
            host = blocks.RaggedLayout.build(torch.full((batch_size,), width), torch.full((batch_size,), context_tokens))
            step = host.to(device)
            host_tokens = torch.randint(0, target.vocab_size, (step.num_tokens,), generator=generator)
            block = blocks.block_tokens(host_tokens[:batch_size], host, 0).to(device)
            wait_for(device)
            began = time.perf_counter()
            hidden, _ = target.forward(host_tokens.to(device), step, target_cache, 0, capture)
            target.lm_head(hidden)
            wait_for(device)
            target_ms[width].append((time.perf_counter() - began) * 1e3)
            for i in order if width > 1 else ():
                began = time.perf_counter()
                propose_drafts(target, drafters[i], block, step, draft_caches[i])
                wait_for(device)
                draft_ms[i][width].append((time.perf_counter() - began) * 1e3)
    return ({w: statistics.median(v) for w, v in target_ms.items()},
            [{w: statistics.median(v) for w, v in per_width.items()} for per_width in draft_ms])


def _setup(target: TargetModel, context_tokens: int, repeats: int, batch_size: int) -> dict:
    return {"context_tokens": context_tokens, "batch_size": batch_size, "repeats": repeats,
            "dtype": str(target.dtype).removeprefix("torch."), "threads": torch.get_num_threads(),
            "cpu_weight_layouts": weight_layouts(target), "machine": device_name(target.device.type)}


@torch.inference_mode()
def measure_step_costs(target: TargetModel, drafter: DFlashDraftModel | None, widths: list[int],
                       context_tokens: int = 128, repeats: int = 7, batch_size: int = 1) -> dict:
    """Median milliseconds of target and drafter forwards per width (each of `batch_size` rows that
    wide), interleaved over repeats; on the target's device, timed to the end of its kernels."""
    target_ms, drafter_ms = _timed_forwards(target, [drafter] if drafter else [], widths, context_tokens, repeats,
                                            batch_size)
    return {**_setup(target, context_tokens, repeats, batch_size), "target_ms": target_ms,
            "drafter_ms": drafter_ms[0] if drafter_ms else {},
            "draft_vocab": drafts_from(drafter.vocabulary) if drafter is not None else None}


@torch.inference_mode()
def measure_drafter_depths(target: TargetModel, drafter: DFlashDraftModel, depths: list[int], widths: list[int],
                           context_tokens: int = 128, repeats: int = 7, batch_size: int = 1) -> dict:
    """What a deeper drafter costs: the drafter's forward per width at each depth in `depths` (fresh
    drafters shaped as `drafter` but for their number of layers; weights do not change the cost) and
    the target's verify, interleaved over repeats. At width W a drafter of depth d beats the one of
    depth `depths[0]` only if its acceptance length is higher by more than `step_ratio[d][W]`, the
    ratio of their steps (verify + draft)."""
    from .cpu_linear import kernel_rule_of, use_measured_kernels

    config = drafter.config
    drafters = []
    for depth in depths:
        fresh = DFlashDraftModel.for_target(target, num_layers=depth, num_target_features=len(config.target_layer_ids),
                                            block_size=config.block_size, mask_token_id=config.mask_token_id)
        fresh.config.target_layer_ids = list(config.target_layer_ids)  # the same features as `drafter`
        fresh.to(target.device, target.dtype)
        if kernel_rule_of(drafter) is not None:  # as the engine runs the loaded drafter on a CPU: its rule
            use_measured_kernels(fresh, kernel_rule_of(drafter))  # (the layers' shapes do not change with depth)
        drafters.append(fresh)
    target_ms, per_drafter = _timed_forwards(target, drafters, widths, context_tokens, repeats, batch_size)
    drafter_ms = dict(zip(depths, per_drafter))
    base = depths[0]
    return {
        **_setup(target, context_tokens, repeats, batch_size), "depths": depths,
        "target_ms": target_ms, "drafter_ms": drafter_ms,
        "step_ratio": {d: {w: (target_ms[w] + drafter_ms[d][w]) / (target_ms[w] + drafter_ms[base][w])
                           for w in widths} for d in depths},
    }


@torch.inference_mode()
def measure_draft_vocab_costs(target: TargetModel, drafter: DFlashDraftModel, vocabularies: dict, widths: list[int],
                              context_tokens: int = 128, repeats: int = 7, batch_size: int = 1) -> dict:
    """What the draft vocabulary saves: the drafter's forward per width with each of `vocabularies`
    (name -> `DraftVocabulary`, or None for every token) beside the target's verify, interleaved."""
    import copy

    drafters = []
    for vocabulary in vocabularies.values():
        variant = copy.copy(drafter)  # the same weights, its own vocabulary
        variant.vocabulary = vocabulary
        drafters.append(variant)
    target_ms, per_drafter = _timed_forwards(target, drafters, widths, context_tokens, repeats, batch_size)
    return {**_setup(target, context_tokens, repeats, batch_size), "target_ms": target_ms,
            "drafter_ms": dict(zip(vocabularies, per_drafter))}


def step_ms(costs: dict, width: int) -> float:
    """Milliseconds of one decode step at `width`: target verify plus (for width > 1) the drafter.
    Accepts tables whose keys are ints or (read back from JSON) strings."""
    def lookup(table, key):
        return table[key] if key in table else table[str(key)]
    return lookup(costs["target_ms"], width) + (lookup(costs["drafter_ms"], width) if width > 1 else 0.0)


@torch.inference_mode()
def measure_padding_cost(target: TargetModel, drafter: DFlashDraftModel, batches: dict[str, list[int]],
                         context_tokens: int = 128, repeats: int = 7) -> dict:
    """One decode step (drafter + target verify) for mixed-width batches, each run two ways: ragged
    (every row at its own width, this runtime's layout) and padded to the batch's widest block (the
    SGLang plugin's layout, whose tail drafts are excluded from acceptance). Median ms per step."""
    generator = torch.Generator().manual_seed(0)
    capture = tuple(drafter.config.target_layer_ids)
    prepared = {}
    for name, widths in batches.items():
        target_cache, (draft_cache,) = filled_caches(target, [drafter], len(widths), context_tokens, max(widths),
                                                     generator)
        prepared[name] = (widths, target_cache, draft_cache)
    ms = {(name, way): [] for name in batches for way in ("ragged", "padded")}
    for _ in range(repeats):
        for name, (widths, target_cache, draft_cache) in prepared.items():
            for way in ("ragged", "padded"):
                step_widths = widths if way == "ragged" else [max(widths)] * len(widths)
                host = blocks.RaggedLayout.build(torch.tensor(step_widths), torch.full((len(widths),), context_tokens))
                step = host.to(target.device)
                tokens = torch.randint(0, target.vocab_size, (step.num_tokens,), generator=generator)
                block = blocks.block_tokens(tokens[: len(widths)], host, 0).to(target.device)
                wait_for(target.device)
                began = time.perf_counter()
                proposed = propose_drafts(target, drafter, block, step, draft_cache)
                hidden, _ = target.forward(proposed, step, target_cache, 0, capture)
                target.lm_head(hidden)
                wait_for(target.device)
                ms[(name, way)].append((time.perf_counter() - began) * 1e3)
    report = {"context_tokens": context_tokens, "repeats": repeats, "threads": torch.get_num_threads(),
              "dtype": str(target.dtype).removeprefix("torch."), "batches": {}}
    for name, widths in batches.items():
        ragged, padded = statistics.median(ms[(name, "ragged")]), statistics.median(ms[(name, "padded")])
        report["batches"][name] = {"widths": widths, "ragged_tokens": sum(widths),
                                   "padded_tokens": max(widths) * len(widths), "ragged_ms": round(ragged, 2),
                                   "padded_ms": round(padded, 2), "padded_over_ragged": round(padded / ragged, 3)}
    return report
