"""The reference policy pi_ref, handled in one place: always under no_grad, always with dropout off.

Strategies:
- `adapter`: LoRA training; pi_ref is the same network with the adapters switched off (no second copy);
- `copy`: full fine-tuning; pi_ref is a frozen copy of the starting weights.
"""

from __future__ import annotations

import contextlib
import copy

import torch
from torch import nn

from dpokit.batching import Batch
from dpokit.logps import CompletionLogps, sum_by_sequence


@contextlib.contextmanager
def eval_mode(module: nn.Module):
    """Dropout off for the duration, then restore each submodule's previous mode."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


class Reference:
    def __init__(self, strategy: str, policy: CompletionLogps, autocast=contextlib.nullcontext):
        """`policy` is the (possibly Accelerate-wrapped) CompletionLogps of the trained model."""
        if strategy not in ("adapter", "copy"):
            raise ValueError(f"unknown reference strategy {strategy!r}")
        self.strategy = strategy
        self.policy = policy
        self.autocast = autocast
        self.frozen: CompletionLogps | None = None
        if strategy == "copy":
            inner = _unwrap(policy)
            self.frozen = CompletionLogps(copy.deepcopy(inner.model), inner.chunk_size).eval()
            self.frozen.requires_grad_(False)

    @torch.no_grad()
    def sequence_logps(self, batch: Batch, token_weights: torch.Tensor | None = None) -> torch.Tensor:
        """(S,) reference log-probs of every sequence of the batch, summed over completion tokens
        (each token times `token_weights` when given, e.g. LD-DPO)."""
        args = (batch.input_ids, batch.position_ids, batch.attention_mask, batch.pred_index, batch.target_ids)
        with self.autocast():
            if self.frozen is not None:
                tok = self.frozen(*args)
            else:
                with eval_mode(self.policy), _unwrap(self.policy).model.disable_adapter():
                    tok = self.policy(*args)
        if token_weights is not None:
            tok = tok * token_weights
        return sum_by_sequence(tok, batch.seq_index, batch.num_seqs)


def _unwrap(module: nn.Module) -> CompletionLogps:
    while not isinstance(module, CompletionLogps):
        module = module.module  # DDP / FSDP wrappers keep the wrapped module in `.module`
    return module
