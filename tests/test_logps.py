"""Completion log-probs on a toy vocabulary, and the chunked path against full logits."""

import math

import pytest
import torch
from torch import nn

from dpokit.batching import Layout
from dpokit.logps import sum_by_sequence, token_logps
from dpokit.tokenize import TokenizedPair


def full_logits_token_logps(
    logits: torch.Tensor, pred_index: torch.Tensor, target_ids: torch.Tensor
) -> torch.Tensor:
    """The plain path the chunked one must match: log_softmax over full (R, T, V) logits, then the targets."""
    logp = torch.log_softmax(logits.float(), dim=-1).reshape(-1, logits.shape[-1])
    return logp[pred_index, target_ids]


def identity_head(v: int) -> nn.Linear:
    head = nn.Linear(v, v, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.eye(v))
    return head


def test_toy_vocabulary_hand_computed():
    # Vocab of 3, identity head, so the hidden state IS the logits vector.
    # Pair: prompt [0], chosen [1, 2], rejected [2]. Rows: chosen [0, 1, 2], rejected [0, 2] (+ pad).
    batch = Layout().pairs([TokenizedPair([0], [1, 2], [2])], pad_id=0)
    hidden = torch.zeros(2, 3, 3)
    hidden[0, 0] = torch.tensor([0.0, math.log(2), 0.0])  # predicts chosen token 1: p = 2/4
    hidden[0, 1] = torch.tensor([0.0, 0.0, 0.0])  # predicts chosen token 2: p = 1/3
    hidden[1, 0] = torch.tensor([math.log(3), 0.0, 0.0])  # predicts rejected token 2: p = 1/5
    tok = token_logps(hidden, identity_head(3), batch.pred_index, batch.target_ids, chunk_size=1)
    seq = sum_by_sequence(tok, batch.seq_index, batch.num_seqs)
    assert tok.tolist() == pytest.approx([math.log(1 / 2), math.log(1 / 3), math.log(1 / 5)], abs=1e-6)
    assert seq.tolist() == pytest.approx([math.log(1 / 6), math.log(1 / 5)], abs=1e-6)
    assert batch.completion_lengths().tolist() == [2, 1]


def test_padding_positions_do_not_count():
    batch = Layout().pairs([TokenizedPair([0], [1, 2, 1, 1], [2])], pad_id=0)
    hidden = torch.randn(2, 5, 3)
    hidden_changed = hidden.clone()
    hidden_changed[1, 2:] = 100.0  # positions of the rejected row that are padding or its last token
    head = identity_head(3)
    a = token_logps(hidden, head, batch.pred_index, batch.target_ids)
    b = token_logps(hidden_changed, head, batch.pred_index, batch.target_ids)
    assert torch.equal(a, b)


@pytest.mark.parametrize("chunk", [1, 3, 7, 4096])
def test_chunked_equals_full_logits_values_and_grads(chunk):
    torch.manual_seed(0)
    pairs = [
        TokenizedPair([1, 2, 3], [4, 5, 6, 7], [8, 9]),
        TokenizedPair([3], [10, 11], [12, 13, 14, 15, 16]),
    ]
    batch = Layout().pairs(pairs, pad_id=0)
    R, T, H, V = batch.input_ids.shape[0], batch.input_ids.shape[1], 8, 20
    head = nn.Linear(H, V, bias=True)
    hidden = torch.randn(R, T, H, dtype=torch.float32, requires_grad=True)

    chunked = sum_by_sequence(
        token_logps(hidden, head, batch.pred_index, batch.target_ids, chunk_size=chunk), batch.seq_index, R
    )
    grads_chunked = torch.autograd.grad(chunked.sum() * 1.0 + chunked[0], [hidden, head.weight, head.bias])

    full = sum_by_sequence(
        full_logits_token_logps(head(hidden), batch.pred_index, batch.target_ids), batch.seq_index, R
    )
    grads_full = torch.autograd.grad(full.sum() * 1.0 + full[0], [hidden, head.weight, head.bias])
    assert torch.allclose(chunked, full, atol=1e-5)
    for a, b in zip(grads_chunked, grads_full, strict=True):
        assert torch.allclose(a, b, atol=1e-5)
