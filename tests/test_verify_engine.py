"""The per-step verify rule inside the engine: lossless, counted, replayed exactly, the draft plan."""

from __future__ import annotations

import pytest
import torch

from blockpilot.runtime import blocks
from blockpilot.runtime.engine import SpeculativeEngine
from blockpilot.runtime.replay import prepare
from blockpilot.runtime.replay_rule import replay_with_rule
from blockpilot.runtime.requests import GenerationRequest
from blockpilot.runtime.sampling import SamplingParams
from blockpilot.runtime.step_verify import StepCostTable, VerifyMode, VerifyRule

from conftest import tiny_drafter, tiny_target
from test_engine import chi_square_rejects, exact_distribution, sample_sequences


def steep_costs(per_token_ms: float = 6.0) -> StepCostTable:
    """A verify whose cost grows fast with its width (a loaded CPU): the rule cuts blocks often."""
    tokens = list(range(1, 65))
    return StepCostTable(tokens, [1e3 / (30 + per_token_ms * (t - 1)) for t in tokens], 64,
                         [2, 8, 64], [0.004, 0.008, 0.03])


def auto_rule(per_token_ms: float = 6.0, draft_plan: bool = True) -> VerifyRule:
    return VerifyRule(VerifyMode.AUTO, steep_costs(per_token_ms), draft_plan=draft_plan)


def tiny_pair(vocab_size=6, seed=3):
    target = tiny_target(vocab_size=vocab_size, seed=seed)
    return target, tiny_drafter(target, block_size=8)


def greedy(engine, prompts, sizes, max_new_tokens=30, verify=None):
    return engine.generate([GenerationRequest(p, SamplingParams(max_new_tokens=max_new_tokens), str(i), block_size=b,
                                              verify=verify) for i, (p, b) in enumerate(zip(prompts, sizes))])


def prompts_for(vocab_size, lengths=(5, 9, 13, 7), seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab_size, (n,), generator=generator).tolist() for n in lengths]


@pytest.mark.parametrize("sizes", [[1, 1, 1, 1], [4, 4, 4, 4], [8, 8, 8, 8], [1, 4, 8, 2], [8, 1, 1, 3]])
def test_verify_rule_keeps_greedy_outputs_and_counts_add_up(sizes):
    target, drafter = tiny_pair()
    prompts = prompts_for(6)
    plain = greedy(SpeculativeEngine(target, None, max_batch_size=4), prompts, [1] * 4)
    for per_token_ms in (0.5, 6.0, 40.0):  # cheap, loaded and very loaded verifies
        engine = SpeculativeEngine(target, drafter, max_batch_size=4, verify_rule=auto_rule(per_token_ms))
        for result, reference, size in zip(greedy(engine, prompts, sizes), plain, sizes):
            assert result.token_ids == reference.token_ids
            s = result.stats
            assert s.verify.startswith("auto")
            assert s.verified_drafts <= s.drafted_tokens
            assert sum(v * c for v, c in s.verified_per_step.items()) == s.verified_drafts
            drafting_steps = sum(s.verified_per_step.values())
            assert drafting_steps + s.drafter_skipped_steps <= s.target_forwards
            committed = sum(k * c for k, c in s.committed_per_step.items())
            assert committed == len(result.token_ids) - 1
            # a step never commits more than its verified drafts + 1
            assert committed - s.target_forwards <= s.verified_drafts
            if size == 1:
                assert s.drafted_tokens == 0


def test_the_rule_cuts_where_verifying_costs_and_not_where_it_is_free():
    target, drafter = tiny_pair()
    prompts = prompts_for(6)
    loaded = SpeculativeEngine(target, drafter, max_batch_size=4, verify_rule=auto_rule(40.0))
    cut = greedy(loaded, prompts, [8] * 4)
    assert sum(r.stats.verified_drafts for r in cut) < sum(r.stats.drafted_tokens for r in cut)
    assert sum(r.stats.drafter_skipped_steps for r in cut) > 0  # hopeless drafts: the plan skips the drafter
    assert all(r.stats.drafter_skipped_steps < r.stats.target_forwards for r in cut)  # and probes again
    no_plan = SpeculativeEngine(target, drafter, max_batch_size=4, verify_rule=auto_rule(40.0, draft_plan=False))
    assert all(r.stats.drafter_skipped_steps == 0 for r in greedy(no_plan, prompts, [8] * 4))
    flat = StepCostTable([1, 64], [30.0, 30.0], 64, [2, 64], [0.004, 0.004])
    free = SpeculativeEngine(target, drafter, max_batch_size=4, verify_rule=VerifyRule(VerifyMode.AUTO, flat))
    whole = greedy(free, prompts, [8] * 4)
    assert all(r.stats.verified_drafts == r.stats.drafted_tokens for r in whole)
    assert all(r.stats.drafter_skipped_steps == 0 for r in whole)


def test_a_request_may_ask_for_full_verify():
    target, drafter = tiny_pair()
    prompts = prompts_for(6)
    engine = SpeculativeEngine(target, drafter, max_batch_size=4, verify_rule=auto_rule(40.0))
    requests = [GenerationRequest(p, SamplingParams(max_new_tokens=30), str(i), block_size=8,
                                  verify=VerifyMode.FULL if i % 2 else None) for i, p in enumerate(prompts)]
    results = engine.generate(requests)
    for i, result in enumerate(results):
        if i % 2:
            assert result.stats.verify == "full"
            assert result.stats.verified_drafts == result.stats.drafted_tokens
        else:
            assert result.stats.verify.startswith("auto")
    without_table = SpeculativeEngine(target, drafter)
    with pytest.raises(ValueError, match="request '0'.*step-cost table"):
        without_table.generate([GenerationRequest(prompts[0], SamplingParams(max_new_tokens=4), "0", block_size=4,
                                                  verify=VerifyMode.AUTO)])
    assert without_table.generate([GenerationRequest(prompts[0], SamplingParams(max_new_tokens=4), "0",
                                                     block_size=4)])[0].stats.verify == "full (no step-cost table)"


@pytest.mark.parametrize("size, per_token_ms, plan", [(3, 6.0, True), (8, 6.0, True), (8, 40.0, True), (8, 6.0, False)])
def test_replay_with_the_rule_counts_what_the_engine_does(size, per_token_ms, plan):
    """Batch 1 (the replay's rule prices each request alone): step for step the same decisions,
    with the plan narrowing blocks and skipping the drafter, and without it."""
    target, drafter = tiny_pair()
    rule = auto_rule(per_token_ms, draft_plan=plan)
    engine = SpeculativeEngine(target, drafter, max_batch_size=1, verify_rule=rule)
    prompts = prompts_for(6)
    results = greedy(engine, prompts, [size] * len(prompts))
    layer_ids = list(drafter.config.target_layer_ids)
    sequences = [prepare(drafter, str(i), p + r.token_ids, len(p), target.sequence_features([p + r.token_ids], layer_ids)[0],
                         30) for i, (p, r) in enumerate(zip(prompts, results))]
    replays = replay_with_rule(target, drafter, sequences, size, rule)
    assert sum(r.stats.verified_drafts for r in results) < sum(r.stats.drafted_tokens for r in results)
    for result, replay in zip(results, replays):
        s = result.stats
        assert replay.target_forwards == s.target_forwards
        assert replay.generated_tokens == s.generated_tokens
        assert sum(replay.verified) == s.verified_drafts
        assert sum(replay.drafted) == s.drafted_tokens
        histogram = {}
        for drafted, verified in zip(replay.drafted, replay.verified):
            if drafted:
                histogram[verified] = histogram.get(verified, 0) + 1
        assert histogram == dict(s.verified_per_step)
        assert sum(1 for d in replay.drafted if d == 0) >= s.drafter_skipped_steps
        if not plan:
            assert s.drafter_skipped_steps == 0


def test_a_sampled_request_is_verified_by_its_temperature_and_replays_exactly():
    """At temperature T the rule prices each draft by the drafter's probability of it at T (what the
    sampled target takes it with), in the engine and in the replay of the engine's own sampled
    output alike: step for step the same decisions. Priced as greedy drafts (here the drafter's
    probability at T = 1), the same output would have more drafts verified. Argmax drafts: their
    survivors are the target's samples, so the output replays exactly."""
    import dataclasses

    target, drafter = tiny_pair()
    rule = auto_rule(2.0, draft_plan=True)
    engine = SpeculativeEngine(target, drafter, max_batch_size=1, verify_rule=rule, sampled_drafts=False)
    prompts = prompts_for(6, lengths=(5, 9, 13, 7, 6, 11))
    results = engine.generate([GenerationRequest(p, SamplingParams(max_new_tokens=30, temperature=3.0, seed=i), str(i),
                                                 block_size=8) for i, p in enumerate(prompts)])
    layer_ids = list(drafter.config.target_layer_ids)
    sequences = [prepare(drafter, str(i), p + r.token_ids, len(p), target.sequence_features([p + r.token_ids], layer_ids)[0],
                         30, temperature=3.0) for i, (p, r) in enumerate(zip(prompts, results))]
    replays = replay_with_rule(target, drafter, sequences, 8, rule)
    for result, replay in zip(results, replays):
        assert replay.target_forwards == result.stats.target_forwards
        assert sum(replay.verified) == result.stats.verified_drafts
        assert sum(replay.drafted) == result.stats.drafted_tokens
    as_greedy = replay_with_rule(target, drafter, [dataclasses.replace(s, temperature=0.0) for s in sequences], 8, rule)
    assert sum(sum(r.verified) for r in replays) < sum(sum(r.verified) for r in as_greedy)


@pytest.mark.parametrize("per_token_ms, verifies", [(0.1, True), (0.4, False)])
def test_sampling_keeps_the_target_distribution_with_the_rule(monkeypatch, per_token_ms, verifies):
    """Every row of a batch here drafts the same block (one prompt), so the rule verifies it in most
    rows or cuts it in most: both ways the samples follow the target's distribution."""
    target = tiny_target(vocab_size=6, seed=5)
    engine = SpeculativeEngine(target, tiny_drafter(target, block_size=4), max_batch_size=256,
                               verify_rule=auto_rule(per_token_ms))
    prompt, n, length, params = [1, 2, 3], 6000, 3, SamplingParams(temperature=1.5)
    probs = exact_distribution(target, prompt, length, params)
    counts = {"drafted": 0, "verified": 0}
    original = SpeculativeEngine._count_step

    def count(state, drafted, verified):
        counts["drafted"] += drafted
        counts["verified"] += verified
        original(state, drafted, verified)

    monkeypatch.setattr(SpeculativeEngine, "_count_step", staticmethod(count))
    speculative, _ = sample_sequences(engine, prompt, n, length, block_size=4, params=params)
    assert not chi_square_rejects(speculative, probs, n)
    assert counts["drafted"] > 0
    assert counts["verified"] > 0 if verifies else counts["verified"] < counts["drafted"]
    if verifies:
        # Negative control: an acceptance that ignores the target (every verified draft kept) breaks it.
        monkeypatch.setattr(blocks, "accept_lengths",
                            lambda proposed, chosen, layout: (layout.widths - 1).clamp(min=0))
        fresh = SpeculativeEngine(target, tiny_drafter(target, block_size=4), max_batch_size=256,
                                  verify_rule=auto_rule(per_token_ms))
        biased, _ = sample_sequences(fresh, prompt, n, length, block_size=4, params=params)
        assert chi_square_rejects(biased, probs, n)
