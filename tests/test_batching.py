"""Padded collation with literal expected tensors."""

import torch

from dpokit.batching import collate_padded, shifted_completion_index
from dpokit.tokenize import TokenizedPair


def test_collate_padded_literal():
    pairs = [TokenizedPair([5, 6], [7], [8, 9], weight=2.0), TokenizedPair([10], [11, 12], [13])]
    b = collate_padded(pairs, pad_id=0)
    # rows: chosen of pair 0, chosen of pair 1, rejected of pair 0, rejected of pair 1
    assert b.input_ids.tolist() == [[5, 6, 7, 0], [10, 11, 12, 0], [5, 6, 8, 9], [10, 13, 0, 0]]
    assert b.attention_mask.tolist() == [[1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]]
    assert b.position_ids.tolist() == [[0, 1, 2, 3]] * 4
    # completion tokens in row-major order: (r0,2)=7 (r1,1)=11 (r1,2)=12 (r2,2)=8 (r2,3)=9 (r3,1)=13,
    # each predicted by the state one position to the left: flat index row * 4 + col - 1.
    assert b.pred_index.tolist() == [1, 4, 5, 9, 10, 12]
    assert b.target_ids.tolist() == [7, 11, 12, 8, 9, 13]
    assert b.seq_index.tolist() == [0, 1, 1, 2, 2, 3]
    assert b.completion_pos.tolist() == [0, 0, 1, 0, 1, 0]
    assert b.completion_lengths().tolist() == [1, 2, 2, 1]
    assert b.num_seqs == 4 and b.num_pairs == 2
    assert b.weights.tolist() == [2.0, 1.0]
    assert b.num_tokens == 12


def test_completion_at_position_zero_is_rejected():
    ids = torch.tensor([[1, 2]])
    mask = torch.tensor([[True, True]])
    try:
        shifted_completion_index(ids, mask, torch.zeros_like(ids))
    except ValueError as err:
        assert "position 0" in str(err)
    else:
        raise AssertionError("expected a ValueError")
