"""How much does the best block size vary *within* one request? (the reviewer's question)

For a request's greedy output, the accepted length of a block starting at any position p is fixed
by the drafter and the known continuation: `acc(p, B)` (`runtime/replay.acceptance_profile`). With that profile, decoding at a fixed
size B is replayed exactly (start at the prompt's end, accept acc(p, B), move on by acc + 1), and
so is an idealised per-step oracle that picks, at every step, the size with the most tokens per
millisecond for that step. Comparing the per-request oracle (one size per request, what
BlockPilot's policy aims at) with the per-step oracle says how much a per-request choice leaves
on the table.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from blockpilot.runtime.step_cost import step_ms


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
