"""The padded-layout block functions of `blockpilot.runtime.blocks` (used by the SGLang worker):
against element-by-element references and against the runtime's ragged accept. Needs torch only.

Run: python -m pytest plugins/sglang/tests -q
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from blockpilot.runtime import blocks  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def test_small_helpers():
    assert blocks.batch_width([4, 1, 9]) == 9
    assert blocks.batch_width([1, 1]) == 2 and blocks.batch_width([]) == 2
    assert blocks.proposed_drafts([1, 4, 16]) == 0 + 3 + 15
    assert blocks.proposed_drafts(torch.tensor([2, 2])) == 2
    assert [blocks.clamp_block_size(s, 4, 12) for s in (1, 2, 4, 9, 12, 20)] == [1, 4, 4, 9, 12, 12]
    assert blocks.last_token_rows([3, 1, 5]) == [2, 3, 8]
    assert blocks.last_token_rows([]) == []


@pytest.mark.parametrize("device", DEVICES)
def test_padded_valid_and_pad_rows(device):
    widths = torch.tensor([3, 1, 4], dtype=torch.int32, device=device)
    valid = blocks.padded_valid(widths, 4)
    assert valid.device.type == device
    assert valid.tolist() == [[True, True, True, False], [True, False, False, False], [True] * 4]
    assert blocks.pad_rows(widths, 5, fill=4).tolist() == [3, 1, 4, 4, 4]
    assert blocks.pad_rows(widths, 2, fill=4).tolist() == [3, 1]
    assert blocks.pad_rows(widths, 5, fill=4).dtype == torch.int32


def dflash_commit(candidates, target):
    """DFlashWorkerV2's greedy rule, written out: accept while candidates[:, j] == target[:, j-1];
    out_tokens = drafts shifted left with the bonus (target at the accept length) placed after them."""
    n, width = candidates.shape
    out = torch.zeros_like(candidates)
    commit = torch.zeros(n, dtype=torch.int32)
    for r in range(n):
        accepted = 0
        while accepted < width - 1 and int(candidates[r, accepted + 1]) == int(target[r, accepted]):
            accepted += 1
        out[r, :accepted] = candidates[r, 1:accepted + 1]
        out[r, accepted] = target[r, accepted]
        commit[r] = accepted + 1
    return out, commit


def partly_correct(seed, n, width, vocab=7):
    """Target predictions and drafts that agree for a random number of leading columns."""
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, vocab, (n, width), generator=g)
    candidates = torch.randint(0, vocab, (n, width), generator=g)
    candidates[:, 0] = torch.randint(0, vocab, (n,), generator=g)  # the bonus of the previous step
    for r in range(n):
        good = int(torch.randint(0, width, (1,), generator=g))  # drafts 1..good are right
        candidates[r, 1:good + 1] = target[r, :good]
        if good + 1 < width:  # and the next one is wrong
            candidates[r, good + 1] = (target[r, good] + 1) % vocab
    return candidates, target


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", range(6))
def test_cap_commits_matches_element_wise_reference(device, seed):
    n, width = 9, 8
    candidates, target = partly_correct(seed, n, width)
    out, commit = dflash_commit(candidates, target)
    widths = torch.randint(1, width + 1, (n,), generator=torch.Generator().manual_seed(100 + seed)).int()
    widths[0], widths[1] = 1, width
    accepted, commits, bonus = blocks.cap_commits(out.to(device), commit.to(device), widths.to(device))
    assert commits.dtype == commit.dtype and accepted.dtype == commit.dtype and bonus.dtype == torch.int64
    for r in range(n):
        keep = min(int(commit[r]), int(widths[r]))
        assert int(commits[r]) == keep and int(accepted[r]) == keep - 1
        assert int(bonus[r]) == int(out[r, keep - 1])


@pytest.mark.parametrize("seed", range(6))
def test_capped_run_is_what_a_width_b_block_commits(seed):
    """The claim the worker rests on: capping a width-W run at B_r gives, token for token, what the
    runtime's ragged engine commits for a width-B_r block (same drafts, greedy)."""
    n, width = 10, 9
    candidates, target = partly_correct(seed, n, width)
    widths = torch.randint(1, width + 1, (n,), generator=torch.Generator().manual_seed(200 + seed))
    widths[0], widths[1], widths[2] = 1, 2, width
    out, commit = dflash_commit(candidates, target)
    _, commits, bonus = blocks.cap_commits(out, commit, widths.int())

    layout = blocks.RaggedLayout.build(widths, torch.zeros(n, dtype=torch.long))
    proposed = torch.cat([candidates[r, :int(widths[r])] for r in range(n)])
    target_packed = torch.cat([target[r, :int(widths[r])] for r in range(n)])
    accepted = blocks.accept_lengths(proposed, target_packed, layout)
    committed = blocks.new_tokens(target_packed, layout, accepted)
    for r in range(n):
        assert int(commits[r]) == int(accepted[r]) + 1 == len(committed[r])
        assert out[r, :int(commits[r])].tolist() == committed[r]
        assert int(bonus[r]) == committed[r][-1]
    assert blocks.proposed_drafts(widths) == int((widths - 1).sum())
