"""Completion log-probs from final hidden states, without building the [rows, seq, vocab] logits.

Only the hidden states that predict completion tokens go through the LM head, in chunks of
`chunk_size` tokens; each chunk is activation-checkpointed, so the backward pass recomputes its
[chunk, vocab] logits instead of keeping them. Peak logits memory is chunk_size x vocab floats.

Imports only torch: the model is reached through the duck-typed methods every HF causal LM has.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def _chunk_token_logps(
    hidden: torch.Tensor, targets: torch.Tensor, head: nn.Module, softcap: float | None, with_sq: bool = False
):
    """(n, H) hidden, (n,) targets -> (n,) log p(target) in fp32; with_sq also (n,) log sum_v p_v^2."""
    logits = head(hidden).float()  # (n, V)
    if softcap:  # Gemma-2 style final logit soft-capping
        logits = softcap * torch.tanh(logits / softcap)
    lse = torch.logsumexp(logits, dim=-1)
    target_logp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse
    if not with_sq:
        return target_logp
    log_sum_sq = torch.logsumexp(2 * (logits - lse.unsqueeze(-1)), dim=-1)  # WPO's normaliser
    return target_logp, log_sum_sq


def token_logps(
    hidden: torch.Tensor,
    head: nn.Module,
    pred_index: torch.Tensor,
    target_ids: torch.Tensor,
    chunk_size: int = 1024,
    softcap: float | None = None,
    with_sq: bool = False,
):
    """Log-probability of each completion token (and, with `with_sq`, log sum_v p_v^2 at that position).

    Args:
        hidden: (R, T, H) final hidden states (after the last norm).
        head: the output projection, (n, H) -> (n, V).
        pred_index: (N,) flat index into R*T of the state predicting each target.
        target_ids: (N,) completion token ids.
    Returns:
        (N,) fp32 log-probs, or a pair of (N,) tensors with `with_sq`.
    """
    flat = hidden.reshape(-1, hidden.shape[-1])
    selected = flat.index_select(0, pred_index)  # (N, H): only completion positions reach the head
    out = []
    for start in range(0, selected.shape[0], chunk_size):
        h, t = selected[start : start + chunk_size], target_ids[start : start + chunk_size]
        if torch.is_grad_enabled() and h.requires_grad:
            out.append(checkpoint(_chunk_token_logps, h, t, head, softcap, with_sq, use_reentrant=False))
        else:
            out.append(_chunk_token_logps(h, t, head, softcap, with_sq))
    if with_sq:
        if not out:
            empty = hidden.new_zeros(0, dtype=torch.float32)
            return empty, empty
        return torch.cat([o[0] for o in out]), torch.cat([o[1] for o in out])
    if not out:
        return hidden.new_zeros(0, dtype=torch.float32)
    return torch.cat(out)


def sum_by_sequence(values: torch.Tensor, seq_index: torch.Tensor, num_seqs: int) -> torch.Tensor:
    """(N,) per-token values -> (S,) sums per sequence."""
    return torch.zeros(num_seqs, dtype=values.dtype, device=values.device).index_add(0, seq_index, values)


class CompletionLogps(nn.Module):
    """Wraps a causal LM (or a PEFT model around one): batch tensors -> per-token completion log-probs.

    Being an nn.Module whose forward does the whole computation lets Accelerate wrap it (DDP, FSDP)
    and apply autocast, while the LM head only sees completion positions.
    """

    def __init__(self, model: nn.Module, chunk_size: int = 1024, bf16: bool = False):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size
        self.bf16 = bf16  # autocast the forward to bf16; the weights stay fp32
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.softcap = getattr(base.config, "final_logit_softcapping", None)
        # What Accelerate's FSDP2 reads off the module it shards: the layer classes to shard one by one
        self._no_split_modules = getattr(base, "_no_split_modules", None)

    # ... and tie_weights, to tie the embeddings again after it loads the weights. (Not the embeddings: given
    # them, it shards the LM head apart, and the head runs once per chunk of completion tokens, a number that
    # differs between processes: their collectives would not match. The head stays in the root's unit.)
    def tie_weights(self, *args, **kwargs):
        return self._base().tie_weights(*args, **kwargs)

    def _base(self) -> nn.Module:
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    def _parts(self) -> tuple[nn.Module, nn.Module]:
        base = self._base()
        return base.get_decoder(), base.get_output_embeddings()

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        pred_index: torch.Tensor,
        target_ids: torch.Tensor,
        blocks: list | None = None,
        with_sq: bool = False,
    ):
        """Batch.model_args -> (N,) log-probs of the completion tokens. `blocks` (per-document attention)
        needs a model switched to block attention (attention.enable_blocks)."""
        decoder, head = self._parts()
        hidden = self.hidden_states(decoder, input_ids, position_ids, attention_mask, blocks)
        with torch.autocast(input_ids.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            return token_logps(hidden, head, pred_index, target_ids, self.chunk_size, self.softcap, with_sq)

    def hidden_states(self, decoder, input_ids, position_ids, attention_mask, blocks) -> torch.Tensor:
        """(R, T, H) final hidden states of the rows (after the last norm)."""
        extra = {}
        if blocks is not None:
            if decoder.config._attn_implementation != "dpokit_blocks":
                raise ValueError(
                    "this batch attends per document (blocks), but the model runs "
                    f"{decoder.config._attn_implementation!r} attention: call dpokit.attention.enable_blocks(model) "
                    "first, or build the batch with dense masks"
                )
            # Block attention ignores the mask; any 4D mask stops transformers from building a (T x T) one.
            attention_mask = torch.ones(
                input_ids.shape[0], 1, 1, 1, dtype=torch.bool, device=input_ids.device
            )
            extra["doc_blocks"] = blocks
        with torch.autocast(input_ids.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            return decoder(
                input_ids=input_ids,
                position_ids=position_ids,
                attention_mask=attention_mask,
                use_cache=False,
                **extra,
            ).last_hidden_state  # (R, T, H)


class RewardScores(CompletionLogps):
    """Wraps a sequence-classification model with one label (a reward model, or a PEFT model around one):
    batch tensors -> (S,) the score of each sequence, read at its last non-pad token (Batch.last_index)
    as transformers' own forward reads it. The same layouts as the policy's: a prompt computed once, each
    completion a branch, packed rows with per-document attention."""

    def _parts(self) -> tuple[nn.Module, nn.Module]:
        base = self._base()
        return getattr(base, base.base_model_prefix), base.score

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        last_index: torch.Tensor,
        blocks: list | None = None,
    ) -> torch.Tensor:
        decoder, head = self._parts()
        hidden = self.hidden_states(decoder, input_ids, position_ids, attention_mask, blocks)
        with torch.autocast(input_ids.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            pooled = hidden.reshape(-1, hidden.shape[-1]).index_select(0, last_index)  # (S, H)
            return head(pooled).float().squeeze(-1)
