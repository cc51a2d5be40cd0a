"""The per-request block logic, on hand-built batches whose answers are worked out by hand."""

import torch

from blockpilot.runtime import blocks


def layout(widths, starts):
    return blocks.RaggedLayout.build(torch.tensor(widths), torch.tensor(starts))


def test_layout_packs_rows_contiguously():
    lay = layout([3, 1, 2], [10, 5, 7])
    assert lay.row.tolist() == [0, 0, 0, 1, 2, 2]
    assert lay.col.tolist() == [0, 1, 2, 0, 0, 1]
    assert lay.positions.tolist() == [10, 11, 12, 5, 7, 8]
    assert lay.offsets.tolist() == [0, 3, 4, 6]
    packed = torch.arange(6)
    grid = lay.pad(packed, fill=-1)
    assert grid.tolist() == [[0, 1, 2], [3, -1, -1], [4, 5, -1]]
    assert lay.unpad(grid).tolist() == packed.tolist()


def test_equal_widths_pad_and_unpad_as_a_ragged_batch_does():
    """Rows of one width (always so at batch 1) take the no-copy path: the same grid and packed
    tensors, feature dimensions and non-contiguous grids included."""
    for widths in ([3], [4, 4, 4], [1, 1]):
        lay = layout(widths, [5] * len(widths))
        assert lay.is_uniform
        packed = torch.randn(sum(widths), 2, 5)
        grid = lay.pad(packed, fill=-1)
        expected = torch.full((len(widths), widths[0], 2, 5), -1.0)
        expected[lay.row, lay.col] = packed
        assert torch.equal(grid, expected)
        transposed = grid.transpose(1, 2).contiguous().transpose(1, 2)  # as attention's output arrives
        assert torch.equal(lay.unpad(transposed), packed)
    assert not layout([3, 1], [0, 0]).is_uniform


def test_block_tokens_put_bonus_first_then_masks():
    lay = layout([3, 1, 2], [0, 0, 0])
    assert blocks.block_tokens(torch.tensor([7, 8, 9]), lay, mask_token_id=99).tolist() == [7, 99, 99, 8, 9, 99]
    assert blocks.draft_slots(lay).tolist() == [1, 2, 5]


def test_accept_lengths_longest_matching_prefix_per_row():
    lay = layout([4, 1, 3, 4], [0, 0, 0, 0])
    # row 0: drafts 5,6,7 vs target 5,6,X -> 2 accepted; row 1: width 1 -> 0;
    # row 2: drafts 3,4 vs target 9,.. -> 0; row 3: all 3 drafts match -> 3
    proposed = torch.tensor([1, 5, 6, 7, 2, 8, 3, 4, 1, 2, 3, 4])
    target = torch.tensor([5, 6, 0, 0, 4, 9, 4, 0, 2, 3, 4, 5])
    accepted = blocks.accept_lengths(proposed, target, lay)
    assert accepted.tolist() == [2, 0, 0, 3]
    # a mismatch early stops acceptance even if later drafts match
    proposed2 = torch.tensor([1, 5, 6, 7])
    target2 = torch.tensor([5, 0, 7, 0])
    assert blocks.accept_lengths(proposed2, target2, layout([4], [0])).tolist() == [1]
    assert blocks.new_tokens(target, lay, accepted) == [[5, 6, 0], [4], [9], [2, 3, 4, 5]]
    assert blocks.committed_slots(lay, accepted).tolist() == [0, 1, 2, 4, 5, 8, 9, 10, 11]


def test_all_width_one_is_plain_decoding():
    lay = layout([1, 1], [3, 4])
    accepted = blocks.accept_lengths(torch.tensor([1, 2]), torch.tensor([3, 4]), lay)
    assert accepted.tolist() == [0, 0]
    assert blocks.new_tokens(torch.tensor([3, 4]), lay, accepted) == [[3], [4]]


def test_causal_verify_mask_uses_absolute_positions():
    lay = layout([2, 1], [2, 0])
    mask = blocks.causal_verify_mask(lay, kv_len=4)[:, 0]
    assert mask[0].int().tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    assert mask[1, 0].int().tolist() == [1, 0, 0, 0]


def test_draft_mask_is_non_causal_and_hides_other_rows_padding():
    lay = layout([3, 1], [2, 1])
    mask = blocks.draft_mask(lay, torch.tensor([2, 1]), kv_len=3)[:, 0]
    # row 0 sees context 0..1 and its 3 block keys from every query
    assert mask[0, 0].int().tolist() == [1, 1, 0, 1, 1, 1]
    assert mask[0, 2].int().tolist() == [1, 1, 0, 1, 1, 1]
    # row 1 sees context 0 and only its own single block key
    assert mask[1, 0].int().tolist() == [1, 0, 0, 1, 0, 0]


def test_accepted_prefix_stops_at_first_mismatch():
    predictions = torch.tensor([[1, 2, 3, 4], [1, 9, 3, 4], [7, 2, 3, 4]])
    labels = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 3, -1]])
    assert blocks.accepted_prefix(predictions, labels).tolist() == [4, 1, 0]
    # a missing label (< 0) never matches, even a prediction of the same value
    assert blocks.accepted_prefix(torch.tensor([[5, -1]]), torch.tensor([[5, -1]])).tolist() == [1]


def test_anchored_draft_mask_sees_context_before_its_anchor_and_its_own_block():
    # two sequences, two anchor slots of width 2, context of 4: sequence 0 anchored at 1 and 3,
    # sequence 1 at 2 with its second slot unused
    mask = blocks.anchored_draft_mask([[1, 3], [2]], anchor_slots=2, block_size=2, context_len=4)
    assert mask.shape == (2, 1, 4, 8)
    assert mask[0, 0].int().tolist() == [[1, 0, 0, 0, 1, 1, 0, 0], [1, 0, 0, 0, 1, 1, 0, 0],
                                         [1, 1, 1, 0, 0, 0, 1, 1], [1, 1, 1, 0, 0, 0, 1, 1]]
    assert mask[1, 0].int().tolist() == [[1, 1, 0, 0, 1, 1, 0, 0], [1, 1, 0, 0, 1, 1, 0, 0],
                                         [0, 0, 0, 0, 0, 0, 1, 1], [0, 0, 0, 0, 0, 0, 1, 1]]


def test_one_anchor_per_sequence_is_the_decode_steps_draft_mask():
    anchors, width, context_len = [3, 1, 4], 5, 4
    lay = layout([width] * 3, anchors)
    assert torch.equal(blocks.anchored_draft_mask([[p] for p in anchors], 1, width, context_len),
                       blocks.draft_mask(lay, torch.tensor(anchors), context_len))


def test_block_size_decision_rule():
    S = blocks.BlockSizeSource
    assert blocks.decide_block_size(4, 16, S.DEFAULT, 8, low=1, high=32) == (4, S.REQUEST)
    assert blocks.decide_block_size(None, 16, S.FIXED, None, low=1, high=32) == (16, S.FIXED)
    assert blocks.decide_block_size(None, 16, S.DEFAULT, 40, low=1, high=32) == (32, S.POLICY)
    assert blocks.decide_block_size(None, 16, S.DEFAULT, 1, low=2, high=8) == (1, S.POLICY)  # 1: no speculation
    assert blocks.decide_block_size(None, 16, S.DEFAULT, 0, "fallback", low=1, high=8) == (1, S.FALLBACK)
    # the source names are the strings in outputs and stats
    assert S.POLICY == "policy" and f"{S.FALLBACK}" == "fallback" and str(S.REQUEST) == "request"
    assert [s.value for s in S] == ["request", "fixed", "default", "policy", "fallback"]
