"""What a BlockPilot server's decode steps cost, by variant, batch size and draft window, from a
`BLOCKPILOT_STEP_LOG` file and the serve benchmark's JSON (which says when each variant ran).

    make serve-bench SERVE_ENV="BLOCKPILOT_STEP_LOG=$PWD/runs/steps.jsonl"
    python examples/step_log_summary.py runs/steps.jsonl runs/serve-bench/serve_bench.json

Per group: steps, median measured ms, median priced ms (the step-cost table), their ratio, and the
correction's median scales the plan priced those steps by (the drafting one at the width the step
verified). A plain step has window 1.
"""

import argparse
import json
import statistics
from collections import defaultdict

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("step_log")
parser.add_argument("serve_bench_json")
args = parser.parse_args()

steps = [json.loads(line) for line in open(args.step_log)]
runs = sorted(json.load(open(args.serve_bench_json))["runs"], key=lambda r: r["started_at"])
runs = [r for r in runs if r["variant"] != "plain"]  # the plain server logs no steps


def run_of(t: float):
    """The BlockPilot run whose window [started_at, started_at + wall_s] holds time `t`."""
    for run in runs:
        if run["started_at"] <= t <= run["started_at"] + run["wall_s"]:
            return run
    return None


groups = defaultdict(list)
for step in steps:
    run = run_of(step["t"])
    if run is not None:
        groups[(run["concurrency"], run["variant"], step["rows"], step["window"])].append(step)

print(f"{len(steps)} steps; {sum(map(len, groups.values()))} inside a BlockPilot run")
print(f"{'conc':>4} {'variant':<10} {'rows':>4} {'window':>6} {'steps':>6} {'measured ms':>11} {'priced ms':>9} "
      f"{'ratio':>6} {'scale plain':>11} {'scale draft':>11}")
for (level, variant, rows, window), group in sorted(groups.items()):
    if len(group) < 3:
        continue
    measured = statistics.median(s["measured_ms"] for s in group)
    priced = statistics.median(s["priced_ms"] for s in group)
    print(f"{level:>4} {variant:<10} {rows:>4} {window:>6} {len(group):>6} {measured:>11.1f} {priced:>9.1f} "
          f"{measured / priced:>6.2f} {statistics.median(s['scale_plain'] for s in group):>11.2f} "
          f"{statistics.median(s['scale_drafting'] for s in group):>11.2f}")
