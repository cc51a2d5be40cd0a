"""Losslessness on the real default model: greedy speculative output equals the target's own greedy
output (transformers `generate`, same dtype) token for token, for every block size and every mix."""

from __future__ import annotations

import pytest
import torch

from blockpilot.runtime.assets import DEFAULT_DRAFTER_DIR
from blockpilot.runtime.drafter import DFlashDraftModel
from blockpilot.runtime.engine import Drafts, SpeculativeEngine
from blockpilot.runtime.requests import GenerationRequest
from blockpilot.runtime.sampling import SamplingParams

from conftest import assert_matches_reference

NEW_TOKENS = 32
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def references(default_target, chat_prompts):
    """transformers' own greedy continuation of every prompt."""
    model = default_target.hf_model
    return [model.generate(torch.tensor([p]), max_new_tokens=NEW_TOKENS, do_sample=False)[0, len(p):].tolist()
            for p in chat_prompts]


def drafters(target):
    yield "untrained", DFlashDraftModel.for_target(target, num_layers=1, num_target_features=4)
    # The shipped drafter is part of the package: a missing one fails here (load raises), never skips.
    yield "shipped", DFlashDraftModel.load(DEFAULT_DRAFTER_DIR)


@pytest.fixture(scope="module", params=["untrained", "shipped"])
def engine(request, default_target):
    found = dict(drafters(default_target))
    return SpeculativeEngine(default_target, found[request.param], max_batch_size=4)


def run(engine, prompts, sizes, max_new=NEW_TOKENS):
    requests = [GenerationRequest(p, SamplingParams(max_new_tokens=max_new), str(i), block_size=b)
                for i, (p, b) in enumerate(zip(prompts, sizes))]
    return engine.generate(requests)


@pytest.mark.parametrize("block_size", [1, 2, 4, 8, 16, 24])
def test_every_block_size_is_lossless(engine, default_target, chat_prompts, references, block_size):
    results = run(engine, chat_prompts, [block_size] * len(chat_prompts))
    for prompt, result, reference in zip(chat_prompts, results, references):
        assert result.stats.block_size == block_size
        assert_matches_reference(default_target, prompt, result.token_ids, reference)


@pytest.mark.parametrize("sizes", [[1, 4, 16, 24], [2, 8, 2, 8], [24, 1, 1, 3]])
def test_mixed_block_sizes_in_one_batch_are_lossless(engine, default_target, chat_prompts, references, sizes):
    for prompt, result, reference in zip(chat_prompts, run(engine, chat_prompts, sizes), references):
        assert_matches_reference(default_target, prompt, result.token_ids, reference)


def test_requests_join_and_leave_the_batch(default_target, chat_prompts, references):
    """Two slots, four requests of different lengths: later requests enter slots freed by earlier ones."""
    engine = SpeculativeEngine(default_target, DFlashDraftModel.for_target(default_target), max_batch_size=2)
    lengths = [8, 32, 16, 24]
    requests = [GenerationRequest(p, SamplingParams(max_new_tokens=n), str(i), block_size=b)
                for i, (p, n, b) in enumerate(zip(chat_prompts, lengths, [16, 4, 1, 8]))]
    for prompt, result, reference, n in zip(chat_prompts, engine.generate(requests), references, lengths):
        assert len(result.token_ids) <= n
        assert_matches_reference(default_target, prompt, result.token_ids, reference[:n])


def test_accepted_drafts_commit_exactly_the_target_tokens(default_target, chat_prompts, references, monkeypatch):
    """Proposals that are mostly right (the reference continuation with one corrupted token at a
    varying place) exercise acceptance of 0..B-1 drafts, KV roll-back and the bonus token."""
    by_id = {str(i): r for i, r in enumerate(references)}
    engine = SpeculativeEngine(default_target, DFlashDraftModel.for_target(default_target), max_batch_size=4)

    def propose(running, proposed, layout, draft_cache):
        proposed = proposed.clone()
        for r, state in enumerate(running):
            width, start = int(layout.widths[r]), int(layout.offsets[r])
            done = len(state.tokens)
            future = by_id[state.request.request_id][done: done + width - 1]
            future += [0] * (width - 1 - len(future))
            wrong = (done * 7) % (width + 2)  # sometimes no corruption at all: the whole block is accepted
            if 1 <= wrong < width:
                future[wrong - 1] = (future[wrong - 1] + 1) % default_target.vocab_size
            proposed[start + 1: start + width] = torch.tensor(future, dtype=torch.long)
        return Drafts(proposed)  # no confidences: every step verifies the whole block

    monkeypatch.setattr(engine, "_propose", propose)
    results = run(engine, chat_prompts, [16, 4, 8, 24])
    accepted_any = False
    for prompt, result, reference in zip(chat_prompts, results, references):
        assert_matches_reference(default_target, prompt, result.token_ids, reference)
        accepted_any |= result.stats.acceptance_length > 2
        committed = sum(k * c for k, c in result.stats.committed_per_step.items())
        assert committed == len(result.token_ids) - 1  # every token after the first came from a verify
    assert accepted_any, "the proposals should have been accepted for long stretches"


def test_streaming_and_stop_strings(default_target, chat_prompts, references):
    engine = SpeculativeEngine(default_target, DFlashDraftModel.for_target(default_target), max_batch_size=2)
    tokenizer = default_target.tokenizer
    full_text = tokenizer.decode(references[0], skip_special_tokens=True)
    stop = full_text[20:26]
    pieces = []
    request = GenerationRequest(chat_prompts[0], SamplingParams(max_new_tokens=NEW_TOKENS, stop=[stop]), "s", block_size=8)
    result = engine.generate([request], on_commit=lambda rid, text, done: pieces.append(text))[0]
    assert result.finish_reason == "stop"
    assert result.text == full_text[: full_text.find(stop)]
    assert "".join(pieces) == result.text
    assert tokenizer.decode(result.token_ids, skip_special_tokens=True).startswith(result.text)


# --- the per-step verify rule on: still the target's own greedy output ----------------------------

def rule_engines(target, max_batch_size=4):
    """The shipped drafter under two cost tables: this machine's shape and a heavily loaded one."""
    from blockpilot.runtime.step_verify import StepCostTable, VerifyMode, VerifyRule

    drafter = DFlashDraftModel.load(DEFAULT_DRAFTER_DIR)
    tokens = list(range(1, 65))
    loaded = StepCostTable(tokens, [1e3 / (30 + 8.0 * (t - 1)) for t in tokens], 64, [2, 64], [0.006, 0.03])
    cpu = StepCostTable(tokens, [1e3 / (30 + 1.5 * (t - 1)) for t in tokens], 64, [2, 64], [0.006, 0.03])
    for costs in (cpu, loaded):
        yield SpeculativeEngine(target, drafter, max_batch_size=max_batch_size,
                                verify_rule=VerifyRule(VerifyMode.AUTO, costs))


@pytest.mark.parametrize("sizes", [[2, 2, 2, 2], [8, 8, 8, 8], [1, 4, 16, 24], [2, 8, 3, 6]])
def test_verify_rule_is_lossless_for_every_size_and_mix(default_target, chat_prompts, references, sizes):
    cut = 0
    for engine in rule_engines(default_target):
        for prompt, result, reference in zip(chat_prompts, run(engine, chat_prompts, sizes), references):
            assert result.stats.verify.startswith("auto")
            assert_matches_reference(default_target, prompt, result.token_ids, reference)
            cut += result.stats.drafted_tokens - result.stats.verified_drafts
    if max(sizes) > 2:
        assert cut > 0, "the rule should have cut some blocks"


def test_verify_rule_is_lossless_as_requests_join_and_leave(default_target, chat_prompts, references):
    lengths = [8, 32, 16, 24]
    for engine in rule_engines(default_target, max_batch_size=2):
        requests = [GenerationRequest(p, SamplingParams(max_new_tokens=n), str(i), block_size=b)
                    for i, (p, n, b) in enumerate(zip(chat_prompts, lengths, [16, 4, 1, 8]))]
        for prompt, result, reference, n in zip(chat_prompts, engine.generate(requests), references, lengths):
            assert_matches_reference(default_target, prompt, result.token_ids, reference[:n])
