"""What a draft vocabulary of each size gives the shipped drafter: acceptance on held-out MT-Bench
(replayed on the target's greedy answers, exact counts), the draft's cost beside the verify on this
machine (measured interleaved), and the projected speed that follows, against drafting from every token.

    python examples/draft_vocab_sizes.py [--sizes 8192,16384,32768] [--output runs/draft_vocab_sizes.json]

The vocabularies are the most frequent tokens of the carried response store (MT-Bench is never in
it). Nothing else may run meanwhile: the draft costs are timings.
"""

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from blockpilot.runtime.assets import DEFAULT_DRAFTER_DIR, cache_dir, ensure_default_model
from blockpilot.runtime.config import EngineConfig, build_engine
from blockpilot.runtime.prompts import mtbench_records
from blockpilot.runtime.replay import replay_every_size
from blockpilot.runtime.step_cost import measure_draft_vocab_costs
from blockpilot.runtime.training.datagen import generate_responses, read_responses
from blockpilot.runtime.training.model_card import totals_by_size
from blockpilot.runtime.training.response_store import ResponseStore, draft_vocabulary

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--sizes", default="8192,16384,32768", help="vocabulary sizes beside the whole vocabulary")
parser.add_argument("--block-sizes", default="2,3,4", help="block sizes replayed")
parser.add_argument("--store", default=str(DEFAULT_DRAFTER_DIR / "data"))
parser.add_argument("--reference", default=str(cache_dir() / "drafter-smollm2-v4-cpu" / "eval-reference"),
                    help="the target's greedy MT-Bench answers (written here first if missing)")
parser.add_argument("--output", default="runs/draft_vocab_sizes.json")
args = parser.parse_args()
block_sizes = [int(s) for s in args.block_sizes.split(",")]

engine = build_engine(EngineConfig(model=str(ensure_default_model()), drafter=str(DEFAULT_DRAFTER_DIR),
                                   draft_vocab="full", max_batch_size=40, max_block_size=max(block_sizes)))
target, drafter = engine.target, engine.drafter
generate_responses(engine, mtbench_records(), Path(args.reference), max_new_tokens=256, shard_size=40)
outputs = read_responses(args.reference)
answer_tokens = np.concatenate([np.asarray(o["response_ids"]) for o in outputs])
vocabularies = {"full": None}
for size in sorted(int(s) for s in args.sizes.split(",")):
    vocabularies[str(size)] = draft_vocabulary(ResponseStore(args.store), size, target.vocab_size)

report = {"prompts": len(outputs), "block_sizes": block_sizes, "vocabularies": {}}
for name, vocabulary in vocabularies.items():
    drafter.vocabulary = vocabulary
    rows = replay_every_size(target, drafter, outputs, block_sizes, 256, show_progress=False)
    accepted = {size: tokens / forwards for size, (tokens, forwards) in sorted(totals_by_size(rows).items())}
    covered = 1.0 if vocabulary is None else float(np.isin(answer_tokens, vocabulary.token_ids.numpy()).mean())
    report["vocabularies"][name] = {"acceptance_length": accepted, "mtbench_answer_tokens_covered": covered}
costs = measure_draft_vocab_costs(target, drafter, vocabularies, sorted({1, *block_sizes}), repeats=15)
report["costs"] = costs
print(f"{len(outputs)} MT-Bench first turns, greedy; step costs: batch 1, {costs['context_tokens']}-token context, "
      f"{costs['dtype']}, {costs['threads']} threads, {costs['machine']}; median of {costs['repeats']}")
plain_ms = costs["target_ms"][1]
for name, entry in report["vocabularies"].items():
    parts = []
    for size in block_sizes:
        draft, verify = costs["drafter_ms"][name][size], costs["target_ms"][size]
        speed = entry["acceptance_length"][size] / (verify + draft) * 1e3
        entry.setdefault("projected_x_plain", {})[size] = speed / (1e3 / plain_ms)
        parts.append(f"block {size}: acceptance {entry['acceptance_length'][size]:.3f}, draft {draft:.2f} ms "
                     f"+ verify {verify:.2f} ms, {speed:.1f} tok/s ({entry['projected_x_plain'][size]:.2f}x plain)")
    print(f"{name:>6} ({entry['mtbench_answer_tokens_covered']:.1%} of MT-Bench answer tokens): " + "; ".join(parts))
Path(args.output).parent.mkdir(parents=True, exist_ok=True)
Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
print(f"written to {args.output}")
