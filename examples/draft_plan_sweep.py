"""The draft plan's outlook knobs (`DraftOutlook.PROBE_AFTER`, `DECAY`) swept on eval-verify's replay:
held-out MT-Bench, batch 1, exact replayed counts priced with the shipped step-cost table, each
variant against the same block size with full verify (and the rule without the plan, for scale).

    python examples/draft_plan_sweep.py --sizes 3,4     # ~5 min here; needs `make eval-verify`'s outputs
"""

import argparse
import dataclasses

import torch

from blockpilot.policy_export.pipeline import PolicyRecipe, _records
from blockpilot.policy_export.verify_pipeline import _engine_and_rule, _sequences
from blockpilot.runtime import replay_rule
from blockpilot.runtime.step_verify import DraftOutlook, VerifyMode

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--config", default="configs/policy-smollm2.yaml")
parser.add_argument("--sizes", default="3,4")
parser.add_argument("--probe-after", default="1,2,4,8")
parser.add_argument("--decay", default="0.3,0.6")
args = parser.parse_args()

recipe = PolicyRecipe.from_yaml(args.config)
engine, rule, _ = _engine_and_rule(recipe, recipe.evaluate.batch_size)
records = _records(recipe.evaluate)[: recipe.verify.eval_prompts]
sequences = _sequences(engine, records, recipe.path("evaluate-reference"), recipe.evaluate.max_new_tokens,
                       recipe.evaluate.batch_size)
target, drafter = engine.target, engine.drafter
shipped = (DraftOutlook.PROBE_AFTER, DraftOutlook.DECAY)
print(f"{len(sequences)} {recipe.evaluate.prompts} outputs, batch 1, projected with {rule.costs.source}; "
      f"shipped knobs: probe after {shipped[0]}, decay {shipped[1]}")
with torch.inference_mode():
    for size in map(int, args.sizes.split(",")):
        profiles = replay_rule.draft_profiles(target, drafter, sequences, size, rule)

        def tokens_per_s(mode: VerifyMode, walk_rule=rule) -> float:
            replays = [replay_rule.walk(p, walk_rule, mode, replay_rule.outcomes_on_demand(target, drafter, s, rule))
                       for p, s in zip(profiles, sequences)]
            return sum(r.generated_tokens for r in replays) / sum(r.seconds(rule) for r in replays)

        full = tokens_per_s(VerifyMode.FULL)
        print(f"block {size}: full verify {full:.2f} tok/s; the rule without the plan "
              f"{tokens_per_s(VerifyMode.AUTO, dataclasses.replace(rule, draft_plan=False)) / full - 1:+.2%}")
        for probe in map(int, args.probe_after.split(",")):
            for decay in map(float, args.decay.split(",")):
                DraftOutlook.PROBE_AFTER, DraftOutlook.DECAY = probe, decay
                print(f"  the rule with the plan, probe after {probe}, decay {decay}: "
                      f"{tokens_per_s(VerifyMode.AUTO) / full - 1:+.2%}", flush=True)
        DraftOutlook.PROBE_AFTER, DraftOutlook.DECAY = shipped
