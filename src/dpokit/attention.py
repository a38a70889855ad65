"""Block attention: a prefix-shared or packed row attends document by document, so attention costs what the
documents cost (the sum of their squared lengths), not the row length squared.

A row of the layouts in batching.py holds documents side by side; a document is a prompt and its branches
(one completion, chosen + rejected, or N samples). Token i of a document may attend to token j of the same
document when j is not after i and j is in the prompt or in i's own branch. The dense implementation writes
that rule into one (row x row) boolean mask: exact, but every query scores every key of the row, and SDPA
cannot use its fastest kernels with an arbitrary mask. Here each document is its own small SDPA problem:
plain causal (the fast kernel) when it has one branch, else a (length x length) mask of the same rule.

It plugs into transformers' attention interface as the implementation "dpokit_blocks", which behaves exactly
like "sdpa" unless the forward pass is given `doc_blocks` (generation and plain calls are unchanged), and
whose mask function is sdpa's. A model takes it with `enable_blocks`; CompletionLogps refuses block batches
for a model that has not.
"""

from __future__ import annotations

import torch.nn.functional as F

BLOCKS = "dpokit_blocks"


def block_attention(
    module,
    query,
    key,
    value,
    attention_mask,
    dropout=0.0,
    scaling=None,
    doc_blocks=None,
    decode_step=False,
    **kwargs,
):
    """query (R, H, T, D), key/value (R, Hkv, T, D) -> ((R, T, H, D), None), like transformers' sdpa.

    `doc_blocks`: batching.Block per document: (row, start, length, (length, length) mask or None).
    `decode_step`: one new token per row against the cache (generate.py's sampler)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if decode_step and query.shape[2] == 1:
        return decode_attention(query, key, value, attention_mask, scaling), None
    if doc_blocks is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    rows, heads, length, dim = query.shape
    gqa = key.shape[1] != heads  # grouped-query attention: SDPA shares each key/value head, no copies
    out = query.new_zeros(rows, length, heads, dim)  # padding positions stay 0: no real token attends to them
    for r, start, n, mask in doc_blocks:
        q = query[r : r + 1, :, start : start + n]
        k = key[r : r + 1, :, start : start + n]
        v = value[r : r + 1, :, start : start + n]
        o = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=mask is None, scale=scaling, enable_gqa=gqa
        )
        out[r, start : start + n] = o[0].transpose(0, 1)
    return out, None


def decode_attention(query, key, value, attention_mask, scaling):
    """One query per row: (B, H, 1, D) against (B, Hkv, T, D) -> (B, 1, H, D) as two small matmuls per
    key/value head (grouped-query heads share it, no copies). CPU SDPA kernels are built for long queries:
    in a profile of SmolLM2 decoding 64 rows, its flash kernel took 35% of the step."""
    import torch

    rows, heads, _, dim = query.shape
    kv_heads = key.shape[1]
    q = query.reshape(rows, kv_heads, heads // kv_heads, dim)  # (B, Hkv, G, D)
    scores = torch.matmul(q, key.transpose(-1, -2)).float() * (scaling if scaling is not None else dim**-0.5)
    if attention_mask is not None:  # sdpa's mask: (B, 1, 1, T), True = may attend
        scores = scores.masked_fill(~attention_mask.view(rows, 1, 1, -1), float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(value.dtype)
    return torch.matmul(probs, value).reshape(rows, 1, heads, dim)  # (B, Hkv, G, D) -> (B, 1, H, D)


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(BLOCKS, block_attention)
    AttentionMaskInterface.register(BLOCKS, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def enable_blocks(model, max_length: int | None = None) -> bool:
    """Switch an sdpa model to block attention (the same numbers for every other call); False when the
    model attends differently and must keep dense masks: eager attention, logit soft-capping, or a sliding
    window narrower than `max_length` (a token is never more than max_length positions from what it sees)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config
    if config._attn_implementation == BLOCKS:
        return True
    window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
    windowed = window is not None and (max_length is None or max_length > window)
    if config._attn_implementation != "sdpa" or windowed or getattr(config, "attn_logit_softcapping", None):
        return False
    _register()
    base.set_attn_implementation(BLOCKS)
    return True
