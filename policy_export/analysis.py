"""How much does the best block size vary *within* one request? (the reviewer's question)

For a request's greedy output, the accepted length of a block starting at any position p is fixed
by the drafter and the known continuation: `acc(p, B)`. With that profile, decoding at a fixed
size B is replayed exactly (start at the prompt's end, accept acc(p, B), move on by acc + 1), and
so is an idealised per-step oracle that picks, at every step, the size with the most tokens per
millisecond for that step. Comparing the per-request oracle (one size per request, what
BlockPilot's policy aims at) with the per-step oracle says how much a per-request choice leaves
on the table.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import torch

from blockpilot.runtime.step_cost import step_ms
from blockpilot.runtime.training.features import Sequence
from blockpilot.runtime.training.train_drafter import batch_for_anchors, drafter_hidden


@torch.no_grad()
def acceptance_profile(target, drafter, sequence: Sequence, sizes: list[int], anchors_per_call: int = 64) -> np.ndarray:
    """`acc[i, j]`: drafts accepted by a block of size `sizes[j]` whose bonus token sits at position
    `sequence.prompt_len + i` (greedy; capped by the tokens the output still has)."""
    positions = list(range(sequence.prompt_len, len(sequence.tokens) - 1))
    profile = np.zeros((len(positions), len(sizes)), dtype=np.int64)
    mask_id = drafter.config.mask_token_id
    for j, size in enumerate(sizes):
        for start in range(0, len(positions), anchors_per_call):
            chunk = positions[start:start + anchors_per_call]
            features, tokens, where, labels, visible = batch_for_anchors([sequence], [chunk], len(chunk), size, mask_id)
            predictions = target.lm_head(drafter_hidden(drafter, target, features, tokens, where, visible)).argmax(-1)
            grid_pred = predictions.view(len(chunk), size)[:, 1:]
            grid_label = labels.view(len(chunk), size)[:, 1:]
            accepted = torch.cumprod((grid_pred == grid_label).long(), dim=1).sum(1)
            profile[start:start + len(chunk), j] = accepted.numpy()
    return profile


def replay(profile: np.ndarray, sizes: list[int], costs: dict, choose) -> tuple[int, float, list[int]]:
    """Decode along the profile, `choose(i)` giving each step's size index; returns (steps, ms, sizes used)."""
    i, steps, ms, used = 0, 0, 0.0, []
    while i < len(profile):
        j = choose(i)
        steps += 1
        ms += step_ms(costs, sizes[j])
        used.append(sizes[j])
        i += int(profile[i, j]) + 1
    return steps, ms, used


def within_request_variation(profiles: dict[str, np.ndarray], sizes: list[int], costs: dict) -> dict:
    """Per-request oracle vs per-step oracle vs best fixed size, on replayed greedy decoding."""
    totals = {"fixed": Counter(), "fixed_ms": Counter()}
    per_request_ms = per_step_ms = tokens = 0.0
    switches, agree, steps_total = [], 0, 0
    for profile in profiles.values():
        n = len(profile)
        tokens += n
        fixed = {j: replay(profile, sizes, costs, lambda i, j=j: j) for j in range(len(sizes))}
        for j, (steps, ms, _) in fixed.items():
            totals["fixed"][sizes[j]] += steps
            totals["fixed_ms"][sizes[j]] += ms
        best_j = min(fixed, key=lambda j: (fixed[j][1], j))
        per_request_ms += fixed[best_j][1]
        gain = (profile + 1) / np.array([step_ms(costs, s) for s in sizes])  # tokens per ms of one step
        steps, ms, used = replay(profile, sizes, costs, lambda i: int(np.argmax(gain[i])))
        per_step_ms += ms
        switches.append(sum(1 for a, b in zip(used, used[1:]) if a != b) / max(len(used) - 1, 1))
        agree += sum(1 for s in used if s == sizes[best_j])
        steps_total += len(used)
    best_fixed = min(sizes, key=lambda s: totals["fixed_ms"][s])
    return {
        "requests": len(profiles), "tokens": int(tokens),
        "tokens_per_s": {
            "best_fixed": round(tokens / totals["fixed_ms"][best_fixed] * 1e3, 3),
            "per_request_oracle": round(tokens / per_request_ms * 1e3, 3),
            "per_step_oracle": round(tokens / per_step_ms * 1e3, 3),
        },
        "best_fixed_size": best_fixed,
        "acceptance_length_fixed": {s: round(tokens / totals["fixed"][s], 4) for s in sizes},
        "per_step_choice_equals_request_best": round(agree / steps_total, 4),
        "mean_fraction_of_steps_switching_size": round(float(np.mean(switches)), 4),
    }
