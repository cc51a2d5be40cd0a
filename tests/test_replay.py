"""Replayed decoding (runtime/replay.py) must count exactly what the engine does: on greedy outputs,
and on sampled ones (the engine's accepted run is its sampled tokens, so replaying its own output
reproduces its steps: acceptance at a temperature is measured by replaying sampled references)."""

from __future__ import annotations

import pytest
import torch

from blockpilot.runtime.drafter import DFlashDraftModel
from blockpilot.runtime.engine import SpeculativeEngine
from blockpilot.runtime.replay import replay_every_size
from blockpilot.runtime.requests import GenerationRequest
from blockpilot.runtime.sampling import SamplingParams

from conftest import tiny_drafter, tiny_target


def engine_and_replay(target, drafter, prompts, size, max_new_tokens, temperature=0.0):
    engine = SpeculativeEngine(target, drafter, max_batch_size=len(prompts), max_block_size=max(size, drafter.config.block_size),
                               sampled_drafts=False)
    results = engine.generate([GenerationRequest(p, SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature,
                                                                   seed=i), str(i), block_size=size)
                               for i, p in enumerate(prompts)])
    outputs = [{"id": str(i), "prompt_ids": list(p), "response_ids": r.token_ids}
               for i, (p, r) in enumerate(zip(prompts, results))]
    rows = replay_every_size(target, drafter, outputs, [size], max_new_tokens, show_progress=False)
    return results, rows


def assert_same_counts(results, rows):
    for result, row in zip(results, rows):
        committed = {}
        for accepted in row["accepted_per_step"]:
            committed[accepted + 1] = committed.get(accepted + 1, 0) + 1
        assert row["generated_tokens"] == result.stats.generated_tokens
        assert row["target_forwards"] == result.stats.target_forwards, (row["id"], row["block_size"])
        assert committed == {k: v for k, v in result.stats.committed_per_step.items() if v}


@pytest.mark.parametrize("size", [2, 5, 8])
def test_replay_counts_equal_the_engine_on_a_tiny_pair(size):
    # A 6-token vocabulary makes random drafts right often enough to exercise multi-token acceptance.
    target = tiny_target(vocab_size=6, seed=3)
    drafter = tiny_drafter(target, block_size=8)
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, 6, (n,), generator=generator).tolist() for n in (5, 9, 13, 7)]
    results, rows = engine_and_replay(target, drafter, prompts, size, max_new_tokens=30)
    assert sum(sum(r["accepted_per_step"]) for r in rows) > 0, "the test needs some accepted drafts"
    assert_same_counts(results, rows)


@pytest.mark.parametrize("size", [3, 8])
def test_replay_of_sampled_outputs_counts_what_the_sampling_engine_did(size):
    """At temperature 1 the engine accepts a draft when it equals the token the target samples there;
    its output is those samples, so replaying it gives the engine's own steps, one for one."""
    target = tiny_target(vocab_size=6, seed=3)
    drafter = tiny_drafter(target, block_size=8)
    generator = torch.Generator().manual_seed(2)
    prompts = [torch.randint(1, 6, (n,), generator=generator).tolist() for n in (5, 9, 13, 7, 6, 11)]
    results, rows = engine_and_replay(target, drafter, prompts, size, max_new_tokens=30, temperature=1.0)
    assert len({tuple(r.token_ids) for r in results}) > 1 and sum(sum(r["accepted_per_step"]) for r in rows) > 0
    assert_same_counts(results, rows)


def test_replay_of_sampled_drafts_follows_the_engines_counts():
    """With sampled drafts the engine's counts are random given its output; replaying the output
    with a coin per draft (survival chance min(1, q(x) / p(x))) gives counts of the same
    distribution: over many sampled outputs the drafts accepted per step agree, where replaying the
    same outputs with argmax drafts counts clearly fewer."""
    target = tiny_target(vocab_size=6, seed=3)
    drafter = tiny_drafter(target, block_size=8)
    generator = torch.Generator().manual_seed(5)
    prompts = [torch.randint(1, 6, (n,), generator=generator).tolist() for n in (5, 9, 13, 7)] * 40
    engine = SpeculativeEngine(target, drafter, max_batch_size=64, max_block_size=8)
    results = engine.generate([GenerationRequest(p, SamplingParams(max_new_tokens=24, temperature=1.0, seed=i), str(i),
                                                 block_size=4) for i, p in enumerate(prompts)])
    outputs = [{"id": str(i), "prompt_ids": list(p), "response_ids": r.token_ids}
               for i, (p, r) in enumerate(zip(prompts, results))]

    def per_step(rows):
        return sum(sum(r["accepted_per_step"]) for r in rows) / sum(len(r["accepted_per_step"]) for r in rows)

    engine_rate = sum(r.stats.generated_tokens - 1 - r.stats.target_forwards for r in results) / sum(
        r.stats.target_forwards for r in results)
    replayed = per_step(replay_every_size(target, drafter, outputs, [4], 24, show_progress=False, sampled_at=1.0))
    as_argmax = per_step(replay_every_size(target, drafter, outputs, [4], 24, show_progress=False))
    assert abs(replayed - engine_rate) < 0.06, (replayed, engine_rate)
    assert as_argmax < engine_rate - 0.15, (as_argmax, engine_rate)


def test_a_block_that_reaches_eos_counts_only_the_tokens_kept():
    # This tiny pair's greedy outputs are long runs of one token, often drafted right; token 4 first
    # appears mid-output in one of them. Made eos, a block reaches it with drafts accepted past it:
    # the output, and the step's count, keep the tokens up to it, the eos included.
    target = tiny_target(vocab_size=8, seed=3)
    drafter = tiny_drafter(target, block_size=8)
    target.hf_model.generation_config.eos_token_id = 4
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, 8, (n,), generator=generator).tolist() for n in (5, 9, 13, 7, 6, 11)]
    results, rows = engine_and_replay(target, drafter, prompts, 8, max_new_tokens=30)
    assert any(r.finish_reason == "eos" and r.stats.generated_tokens > 4 for r in results), "the test needs eos"
    for result in results:  # the first token comes from the prefill, every later one from a step
        assert sum(k * c for k, c in result.stats.committed_per_step.items()) == result.stats.generated_tokens - 1
    assert_same_counts(results, rows)


@pytest.mark.slow
def test_replay_counts_equal_the_engine_with_the_shipped_drafter(default_target, chat_prompts):
    from blockpilot.runtime.assets import DEFAULT_DRAFTER_DIR

    drafter = DFlashDraftModel.load(DEFAULT_DRAFTER_DIR)
    for size in (6, 16):
        results, rows = engine_and_replay(default_target, drafter, chat_prompts, size, max_new_tokens=96)
        assert sum(sum(r["accepted_per_step"]) for r in rows) > len(rows) * 10
        assert_same_counts(results, rows)
