"""Two or more drafters side by side on the held-out MT-Bench replay: acceptance length per block size
and the per-position draft accuracy at block size 4 (as the eval stage's model card reports them).

    python examples/compare_drafters.py OLD_DRAFTER_DIR NEW_DRAFTER_DIR [--sizes 2,3,4]

The target's greedy MT-Bench outputs come from a drafter recipe's eval-reference (its eval stage
writes them once); every drafter is replayed on the same outputs, so the counts are exact and equal
to what the engine would commit. `--held-out-features` also replays each drafter on the held-out part
of the training store (a train stage's features folder): whether what a drafter learned from its data
carries over to MT-Bench.
"""

import argparse
from pathlib import Path

from blockpilot.runtime.assets import cache_dir, ensure_default_model
from blockpilot.runtime.config import parse_sizes
from blockpilot.runtime.drafter import DFlashDraftModel
from blockpilot.runtime.replay import replay_every_size
from blockpilot.runtime.target import TargetModel
from blockpilot.runtime.training.datagen import read_responses
from blockpilot.runtime.training.features import load_sequences
from blockpilot.runtime.training.model_card import POSITION_ACCURACY_SIZE, position_accuracy, totals_by_size
from blockpilot.runtime.training.train_drafter import replayed_acceptance, split_by_part

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("drafters", nargs="+")
parser.add_argument("--sizes", default="2,3,4", help="block sizes replayed, e.g. 2,3,4 or 2-8")
parser.add_argument("--reference", default=str(cache_dir() / "drafter-smollm2-v2" / "eval-reference"))
parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="the target and the drafters run in it (the answers replayed stay the reference's)")
parser.add_argument("--held-out-features", help="a train stage's features folder (WORK_DIR/data/features-...): "
                    "each drafter also replayed on its held-out responses (the first 64), at --sizes")
parser.add_argument("--from-shard", type=int, default=0, help="with --held-out-features: its shards from this one on")
args = parser.parse_args()
sizes = sorted({*parse_sizes(args.sizes), POSITION_ACCURACY_SIZE})
target = TargetModel.load(ensure_default_model(), args.dtype)
outputs = read_responses(args.reference)
print(f"{len(outputs)} MT-Bench first turns, greedy, from {args.reference}; replayed in {args.dtype}")
held_out = []
if args.held_out_features:
    indexes = [p for p in sorted(Path(args.held_out_features).glob("features-*.json"))
               if int(p.stem.split("-")[1]) >= args.from_shard]
    held_out = split_by_part(load_sequences(indexes, target.hidden_size))[1][:64]
    print(f"and {len(held_out)} held-out store responses of {len(indexes)} feature shards from shard {args.from_shard} "
          f"in {args.held_out_features}")
for directory in args.drafters:
    drafter = DFlashDraftModel.load(directory).to(target.dtype)
    rows = replay_every_size(target, drafter, outputs, sizes, 256, show_progress=False)
    accepted = {size: tokens / forwards for size, (tokens, forwards) in sorted(totals_by_size(rows).items())}
    positions = position_accuracy(rows, POSITION_ACCURACY_SIZE)["positions"]
    print(f"{directory}: acceptance length " + ", ".join(f"{s}: {a:.3f}" for s, a in accepted.items())
          + f"; block {POSITION_ACCURACY_SIZE} draft accuracy " + ", ".join(
              f"position {k}: {v['reached']:.3f} ({v['given_previous']:.3f} given the ones before)"
              for k, v in positions.items()), flush=True)
    if held_out:
        print("  held-out store responses: acceptance length " + ", ".join(
            f"{size}: {replayed_acceptance(drafter, target, held_out, size):.3f}" for size in sorted(parse_sizes(args.sizes))),
              flush=True)
