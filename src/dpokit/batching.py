"""Batch layouts: the one place that turns tokenized pairs into model rows and a completion index.

A layout decides how sequences are placed in rows (padded: one sequence per row, right-padded). Whatever
the layout, the result is a `Batch` whose completion index says, for every completion token, which hidden
state predicts it (`pred_index`, a flat index into rows x positions), which token it is (`target_ids`)
and which sequence it belongs to (`seq_index`). The log-prob code reads only that index, so packed and
prefix-shared layouts plug in here without change elsewhere.

Sequence numbering for P pairs: chosen of pair p is sequence p, rejected is sequence P + p.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from dpokit.tokenize import TokenizedPair, TokenizedUnpaired


@dataclass
class Batch:
    input_ids: torch.Tensor
    """(R, T) token ids; padding holds pad_id."""
    position_ids: torch.Tensor
    """(R, T) positions fed to the rotary/absolute embeddings."""
    attention_mask: torch.Tensor
    """(R, T) 1/0 padding mask (causal attention implied), or (R, 1, T, T) bool, True = may attend."""
    pred_index: torch.Tensor
    """(N,) flat index (row * T + position) of the hidden state that predicts each completion token."""
    target_ids: torch.Tensor
    """(N,) the completion tokens."""
    seq_index: torch.Tensor
    """(N,) sequence each completion token belongs to, in [0, num_seqs)."""
    completion_pos: torch.Tensor
    """(N,) position of each token inside its completion (0 = first completion token)."""
    num_seqs: int
    weights: torch.Tensor
    """(P,) per-pair weights (1.0 unless the data gives a `weight`)."""
    num_tokens: int
    """Real (non-padding) tokens in the rows: the work the forward pass does."""
    labels: torch.Tensor | None = None
    """(B,) bool desirability of unpaired examples (KTO); None for pairs."""

    @property
    def num_pairs(self) -> int:
        return self.num_seqs // 2

    def completion_lengths(self) -> torch.Tensor:
        """(S,) completion tokens per sequence."""
        return torch.bincount(self.seq_index, minlength=self.num_seqs)

    def to(self, device: torch.device | str) -> Batch:
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}
        return Batch(**moved)


def shifted_completion_index(
    input_ids: torch.Tensor, completion_mask: torch.Tensor, seq_of_token: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Completion index for layouts where each completion token is predicted by the token just before it.

    Args:
        input_ids: (R, T) ids.
        completion_mask: (R, T) bool, True on completion tokens. Position 0 of a row is never a target.
        seq_of_token: (R, T) long, the sequence id of each token (read only where the mask is True).
    Returns:
        pred_index (N,), target_ids (N,), seq_index (N,), completion_pos (N,), in row-major order.
    """
    R, T = input_ids.shape
    if completion_mask[:, 0].any():
        raise ValueError("a completion token at position 0 has no preceding token to predict it")
    rows, cols = completion_mask.nonzero(as_tuple=True)  # row-major order
    pred_index = rows * T + (cols - 1)  # the explicit shift: token t is predicted by the state at t - 1
    seq_index = seq_of_token[rows, cols]
    # position inside the completion = running count of earlier tokens of the same sequence
    first = torch.zeros_like(seq_index, dtype=torch.bool)
    first[0:1] = True
    if len(seq_index) > 1:
        first[1:] = seq_index[1:] != seq_index[:-1]
    starts = torch.nonzero(first).flatten()
    run_lengths = torch.diff(torch.cat([starts, torch.tensor([len(seq_index)])]))
    offsets = torch.repeat_interleave(starts, run_lengths)
    completion_pos = torch.arange(len(seq_index)) - offsets
    return pred_index, input_ids[rows, cols], seq_index, completion_pos


def collate_sequences(sequences: list[tuple[list[int], list[int]]], pad_id: int, weights: list[float]) -> Batch:
    """One (prompt, completion) sequence per row, right-padded; sequence i is row i."""
    T = max(len(prompt) + len(completion) for prompt, completion in sequences)
    R = len(sequences)
    input_ids = torch.full((R, T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((R, T), dtype=torch.long)
    completion_mask = torch.zeros((R, T), dtype=torch.bool)
    for r, (prompt, completion) in enumerate(sequences):
        n = len(prompt) + len(completion)
        input_ids[r, :n] = torch.tensor(prompt + completion, dtype=torch.long)
        attention_mask[r, :n] = 1
        completion_mask[r, len(prompt) : n] = True
    seq_of_token = torch.arange(R).unsqueeze(1).expand(R, T)
    pred, target, seq, pos = shifted_completion_index(input_ids, completion_mask, seq_of_token)
    return Batch(
        input_ids=input_ids,
        position_ids=torch.arange(T).unsqueeze(0).expand(R, T).contiguous(),
        attention_mask=attention_mask,
        pred_index=pred,
        target_ids=target,
        seq_index=seq,
        completion_pos=pos,
        num_seqs=R,
        weights=torch.tensor(weights, dtype=torch.float32),
        num_tokens=int(attention_mask.sum()),
    )


def collate_padded(pairs: list[TokenizedPair], pad_id: int) -> Batch:
    """Pairs, one sequence per row, right-padded: rows 0..P-1 chosen, P..2P-1 rejected."""
    sequences = [(p.prompt_ids, p.chosen_ids) for p in pairs] + [(p.prompt_ids, p.rejected_ids) for p in pairs]
    return collate_sequences(sequences, pad_id, [p.weight for p in pairs])


def collate_unpaired(examples: list[TokenizedUnpaired], pad_id: int, max_length: int) -> tuple[Batch, Batch]:
    """(targets, mismatched) batches for KTO.

    The mismatched batch pairs prompt i with the completion of example (i + 1) mod B (cut to fit
    max_length): its log-ratios estimate KL(pi_theta || pi_ref), the KTO baseline z0 (arXiv:2402.01306, sec. 4.1).
    """
    B = len(examples)
    targets = collate_sequences([(e.prompt_ids, e.completion_ids) for e in examples], pad_id, [e.weight for e in examples])
    targets.labels = torch.tensor([e.label for e in examples], dtype=torch.bool)
    shifted = [
        (e.prompt_ids, examples[(i + 1) % B].completion_ids[: max(max_length - len(e.prompt_ids), 1)])
        for i, e in enumerate(examples)
    ]
    return targets, collate_sequences(shifted, pad_id, [1.0] * B)


LAYOUTS: dict[str, Callable[[list[TokenizedPair], int], Batch]] = {"padded": collate_padded}
