"""Would a draft vocabulary pay here? (docs/measurements.md, Serving.)

A drafter whose logits cover a shortlist of frequent tokens (as EAGLE-3 drafts over 32k of 128k)
reads less of the lm_head per draft, but can never propose a token outside the list. This prints
both sides on this machine: the lm_head's cost over a few draft rows, full and shortlisted, and the
share of the target's MT-Bench output tokens a shortlist covers when built from the target's own
outputs on the drafter's training data (filled up by token id, BPE's merge order).

    .venv/bin/python examples/draft_vocab_check.py [--training-data DIR ...] [--held-out DIR]

Defaults: the drafter v2 data stage's responses and the v2 eval stage's MT-Bench reference outputs
under $BLOCKPILOT_CACHE (run those stages first).
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time
from pathlib import Path

import torch

from blockpilot.runtime.assets import cache_dir, ensure_default_model
from blockpilot.runtime.target import TargetModel
from blockpilot.runtime.training.datagen import read_responses


def shortlist(counts: collections.Counter, size: int) -> set[int]:
    chosen = {token for token, _ in counts.most_common(size)}
    filler = 0
    while len(chosen) < size:
        chosen.add(filler)
        filler += 1
    return chosen


def median_ms(weight: torch.Tensor, rows: int, repeats: int = 30) -> float:
    hidden = torch.randn(rows, weight.shape[1])
    times = []
    for i in range(repeats + 5):
        began = time.perf_counter()
        logits = hidden @ weight.T
        logits.argmax(-1)  # what drafting reads: the draft and its confidence
        torch.softmax(logits, -1)
        if i >= 5:
            times.append(time.perf_counter() - began)
    return statistics.median(times) * 1e3


def main() -> None:
    v2 = cache_dir() / "drafter-smollm2-v2"
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--training-data", type=Path, nargs="+", default=[v2 / "data", v2 / "data" / "self-questions"])
    parser.add_argument("--held-out", type=Path, default=v2 / "eval-reference")
    parser.add_argument("--sizes", type=int, nargs="+", default=[16384, 24576, 32768])
    args = parser.parse_args()
    counts = collections.Counter(t for d in args.training_data for row in read_responses(d) for t in row["response_ids"])
    held_out = [t for row in read_responses(args.held_out) for t in row["response_ids"]]
    if not counts or not held_out:
        raise SystemExit(f"no responses in {args.training_data} or {args.held_out}: run the drafter v2 data and eval stages")
    print(f"training outputs: {sum(counts.values())} tokens ({len(counts)} distinct); held out: {len(held_out)} tokens")
    lm_head = TargetModel.load(ensure_default_model(), "float32").lm_head.weight.detach()
    print(f"torch threads {torch.get_num_threads()}; lm_head {tuple(lm_head.shape)}, median ms over 30 calls")
    for size in args.sizes:
        covered = shortlist(counts, size)
        share = sum(t in covered for t in held_out) / len(held_out)
        ids = torch.tensor(sorted(covered))
        short = lm_head[ids].contiguous()
        cost = ", ".join(f"{rows} rows {median_ms(lm_head, rows):.2f} -> {median_ms(short, rows):.2f} ms"
                         for rows in (1, 3, 7))
        print(f"shortlist {size:>6}: covers {share:.1%} of the held-out output tokens; lm_head {cost}")


if __name__ == "__main__":
    main()
