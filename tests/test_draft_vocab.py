"""The draft vocabulary (runtime/draft_vocab.py): drafts come from a list of frequent tokens, their
logits computed over those rows of the target's head only. Output stays the target's own: greedy
token for token, sampled in distribution; replayed counts stay the engine's; bad files are refused
with the reason."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
import torch

from blockpilot.runtime.draft_vocab import DraftVocabulary, most_frequent_tokens, resolve_draft_vocab_path
from blockpilot.runtime.drafter import DFlashDraftModel
from blockpilot.runtime.engine import SpeculativeEngine
from blockpilot.runtime.replay import replay_every_size
from blockpilot.runtime.requests import GenerationRequest
from blockpilot.runtime.sampling import SamplingParams

from conftest import tiny_drafter, tiny_target
from test_engine import chi_square_rejects, exact_distribution


def test_logits_are_the_heads_own_at_its_tokens_and_minus_infinity_elsewhere():
    head = torch.nn.Linear(8, 20, bias=True)
    vocabulary = DraftVocabulary(torch.tensor([17, 3, 3, 9, 0]), 20)
    assert vocabulary.token_ids.tolist() == [0, 3, 9, 17]  # sorted, unique
    hidden = torch.randn(2, 5, 8)
    logits = vocabulary.logits(head, hidden)
    full = head(hidden)
    assert logits.shape == full.shape
    kept = vocabulary.token_ids
    torch.testing.assert_close(logits[..., kept], full[..., kept])
    others = torch.ones(20, dtype=torch.bool)
    others[kept] = False
    assert torch.isneginf(logits[..., others]).all()
    assert set(logits.argmax(-1).flatten().tolist()) <= set(kept.tolist())


def test_a_drafter_with_a_vocabulary_drafts_from_it_and_keeps_it_through_save_and_load(tmp_path):
    target = tiny_target(vocab_size=64)
    drafter = tiny_drafter(target)
    hidden = torch.randn(3, target.hidden_size)
    torch.testing.assert_close(drafter.logits(target.lm_head, hidden), target.lm_head(hidden))  # none: every token
    drafter.vocabulary = DraftVocabulary(torch.arange(10, 30), 64)
    drafter.save(tmp_path)
    loaded = DFlashDraftModel.load(tmp_path)
    assert loaded.vocabulary.token_ids.tolist() == list(range(10, 30))
    assert set(loaded.logits(target.lm_head, hidden).argmax(-1).tolist()) <= set(range(10, 30))


def test_most_frequent_tokens_ranks_by_count_then_id():
    ids = most_frequent_tokens([np.array([5, 5, 2, 7]), np.array([7, 5, 9, 2])], 3)
    assert ids.tolist() == [2, 5, 7]  # 5 x3, then 2 and 7 x2 each; 9 once is left out
    assert most_frequent_tokens([np.array([4])], 10).tolist() == [4]  # only tokens seen


def test_sglang_token_map_files_load_and_bad_files_are_refused_with_the_reason(tmp_path):
    listed = tmp_path / "hot_token_ids.pt"
    torch.save([3, 1, 2], listed)  # SGLang's --speculative-token-map holds a list
    assert DraftVocabulary.load(listed, 8).token_ids.tolist() == [1, 2, 3]
    cases = {
        "missing.pt": (None, FileNotFoundError, "does not exist"),
        "corrupt.pt": (b"\x00not a torch file", ValueError, "not a saved list of token ids"),
        "matrix.pt": (torch.zeros(2, 2, dtype=torch.long), ValueError, "1-D list of integer token ids"),
        "floats.pt": (torch.tensor([1.0, 2.0]), ValueError, "1-D list of integer token ids"),
        "empty.pt": (torch.zeros(0, dtype=torch.long), ValueError, "non-empty"),
        "too_big.pt": (torch.tensor([1, 8]), ValueError, r"must be in 0\.\.7"),
        "dict.pt": ({"ids": torch.tensor([1])}, ValueError, "holds a dict"),
    }
    for name, (content, error, message) in cases.items():
        path = tmp_path / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif content is not None:
            torch.save(content, path)
        with pytest.raises(error, match=message):
            DraftVocabulary.load(path, 8)


def test_the_setting_rule(tmp_path):
    assert resolve_draft_vocab_path(None, tmp_path) is None  # the drafter ships none
    torch.save(torch.tensor([1, 2]), tmp_path / "draft_vocab.pt")
    assert resolve_draft_vocab_path(None, tmp_path) == tmp_path / "draft_vocab.pt"
    for every_token in ("full", "none", "off", "Full ", ""):  # every token, whatever the drafter ships
        assert resolve_draft_vocab_path(every_token, tmp_path) is None
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_draft_vocab_path("ul", tmp_path)  # a word that is no setting is a path, which must exist
    assert resolve_draft_vocab_path(str(tmp_path / "draft_vocab.pt"), None) == tmp_path / "draft_vocab.pt"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_draft_vocab_path(str(tmp_path / "nope.pt"), None)


def _tiny_pair(vocab_size: int, keep: list[int], seed: int = 3):
    target = tiny_target(vocab_size=vocab_size, seed=seed)
    drafter = tiny_drafter(target, block_size=8)
    drafter.vocabulary = DraftVocabulary(torch.tensor(keep), vocab_size)
    return target, drafter


@pytest.mark.parametrize("sizes", [[2, 2, 2, 2], [5, 5, 5, 5], [1, 4, 8, 3]])
def test_greedy_output_is_the_targets_own_with_a_draft_vocabulary(sizes):
    target, drafter = _tiny_pair(6, keep=[1, 2, 4])  # the target also writes 0, 3 and 5
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, 6, (n,), generator=generator).tolist() for n in (5, 9, 13, 7)]
    engine = SpeculativeEngine(target, drafter, max_batch_size=4)

    def run(block_sizes):
        return engine.generate([GenerationRequest(p, SamplingParams(max_new_tokens=30), str(i), block_size=b)
                                for i, (p, b) in enumerate(zip(prompts, block_sizes))])

    plain, speculative = run([1] * 4), run(sizes)
    assert [r.token_ids for r in speculative] == [r.token_ids for r in plain]
    outside = {0, 3, 5} & {t for r in plain for t in r.token_ids}
    assert outside, "the test needs outputs with tokens the drafter cannot propose"
    if max(sizes) > 1:
        assert sum(r.stats.verified_drafts for r in speculative) > 0


@pytest.mark.parametrize("sampled_drafts", [True, False], ids=["sampled drafts", "argmax drafts"])
def test_sampling_keeps_the_target_distribution_with_a_draft_vocabulary(sampled_drafts):
    """Drafts never propose tokens 0 and 3, which the target samples often: speculative sampling
    weighs a draft distribution that is zero there, and the first three tokens still follow the
    target's exact joint distribution."""
    target, drafter = _tiny_pair(6, keep=[1, 2, 4, 5], seed=5)
    engine = SpeculativeEngine(target, drafter, max_batch_size=256, sampled_drafts=sampled_drafts)
    params = SamplingParams(temperature=1.5)
    prompt, n, length = [1, 2, 3], 6000, 3
    probs = exact_distribution(target, prompt, length, params)
    assert sum(p for seq, p in probs.items() if {0, 3} & set(seq)) > 0.2, "the target must write 0 or 3 often"
    results = engine.generate([GenerationRequest(prompt, replace(params, seed=seed, max_new_tokens=length), str(seed),
                                                 block_size=4) for seed in range(n)])
    assert sum(r.stats.acceptance_length for r in results) / n > 1.1, "the test needs drafts that survive"
    assert not chi_square_rejects(Counter(tuple(r.token_ids) for r in results), probs, n)


@pytest.mark.parametrize("size", [3, 8])
def test_replayed_counts_are_the_engines_with_a_draft_vocabulary(size):
    from test_replay import assert_same_counts, engine_and_replay

    target, drafter = _tiny_pair(6, keep=[1, 2, 4])
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, 6, (n,), generator=generator).tolist() for n in (5, 9, 13, 7)]
    results, rows = engine_and_replay(target, drafter, prompts, size, max_new_tokens=30)
    assert sum(sum(r["accepted_per_step"]) for r in rows) > 0, "the test needs some accepted drafts"
    assert_same_counts(results, rows)
    full = replay_every_size(target, replace_vocabulary(drafter, None), [
        {"id": str(i), "prompt_ids": p, "response_ids": r.token_ids} for i, (p, r) in enumerate(zip(prompts, results))],
        [size], 30, show_progress=False)
    assert [r["accepted_per_step"] for r in full] != [r["accepted_per_step"] for r in rows], \
        "the vocabulary must change what is drafted here, or this test shows nothing"


def replace_vocabulary(drafter, vocabulary):
    import copy

    other = copy.deepcopy(drafter)
    other.vocabulary = vocabulary
    return other
