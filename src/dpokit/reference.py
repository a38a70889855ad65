"""The reference policy pi_ref, in one place. Training, held-out evaluation and sampling ask it the same two
things: its log-probs for a batch (`sequence_logps`), and itself as a causal LM to sample from or to score
samples with (`module`). It always runs under no_grad with dropout off.

Strategies, each a constructor of `Reference`:
- `Reference.adapters_off(policy)`: LoRA training; the policy's own network with its adapters switched off
  (no second copy of the weights);
- `Reference.frozen_copy(policy)`: full fine-tuning; a frozen copy of the starting weights, taken before
  Accelerate prepares the policy (`frozen_start`);
- `Reference.separate(model)`: another checkpoint (the starting model of a saved full fine-tuning run, or
  one the user names);
- `Reference.initial(policy)`: the policy as it is, valid only before its first update (fills the cache in
  full fine-tuning without a copy);
- `Reference.cached(table)`: log-probs computed once before training (refcache.py), looked up per batch.
"""

from __future__ import annotations

import contextlib
import copy
import functools
from collections.abc import Iterator

import torch
from torch import nn

from dpokit.batching import Batch
from dpokit.logps import CompletionLogps
from dpokit.sharding import lockstep, shard_like, zero3


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


def unwrap(module: nn.Module) -> CompletionLogps:
    while not isinstance(module, CompletionLogps):
        module = module.module  # DDP / FSDP wrappers keep the wrapped module in `.module`
    return module


class Reference:
    """pi_ref for one run; build it with one of the constructors below."""

    def __init__(self, network: nn.Module | None, *, disable_adapters: bool = False, table=None):
        self.network = network
        """A CompletionLogps (possibly wrapped by DDP/FSDP), or None for a cached reference."""
        self.disable_adapters = disable_adapters
        self.table = table
        """A refcache.CachedLogps for a cached reference."""

    @classmethod
    def adapters_off(cls, policy: nn.Module) -> Reference:
        return cls(policy, disable_adapters=True)

    @classmethod
    def frozen_copy(cls, policy: nn.Module) -> Reference:
        inner = unwrap(policy)
        return cls.separate(copy.deepcopy(inner.model), inner.chunk_size, inner.bf16)

    @classmethod
    def separate(cls, model: nn.Module, chunk_size: int = 1024, bf16: bool = False) -> Reference:
        model.eval().requires_grad_(False)
        return cls(CompletionLogps(model, chunk_size, bf16))

    @classmethod
    def initial(cls, policy: nn.Module) -> Reference:
        return cls(policy)

    @classmethod
    def cached(cls, table) -> Reference:
        return cls(None, table=table)

    @contextlib.contextmanager
    def _active(self) -> Iterator[None]:
        if self.network is None:
            raise TypeError("a cached reference holds log-probs only: it has no model to run or sample from")
        off = (
            unwrap(self.network).model.disable_adapter()
            if self.disable_adapters
            else contextlib.nullcontext()
        )
        with torch.no_grad(), eval_mode(self.network), off:
            yield

    def sequence_logps(self, batch: Batch, token_weights: torch.Tensor | None = None) -> torch.Tensor:
        """(S,) log pi_ref of each completion of `batch`, summed over its tokens (times `token_weights`)."""
        if self.table is not None:
            return self.table.lookup(batch)
        with self._active():
            tok = self.network(*batch.model_args)
        return batch.sequence_sums(tok if token_weights is None else tok * token_weights)

    @contextlib.contextmanager
    def module(self) -> Iterator[nn.Module]:
        """The reference as a causal LM (`generate`, forward), for the duration."""
        with self._active():
            yield unwrap(self.network).model


def frozen_start(
    cfg, objective, policy: nn.Module, reference_model: nn.Module | None, reload=None
) -> Reference | None:
    """Full fine-tuning's live reference, a frozen copy of the starting weights, taken from the policy before
    Accelerate prepares it (FSDP2 shards the policy in place, and a sharded module cannot be copied); None
    when the run's reference is anything else. Under ZeRO-3 the policy's weights are partitioned from the
    load on: `reload()` loads the starting model again instead."""
    live = objective.needs_reference and not cfg.train.precompute_ref
    if not (live and not cfg.lora.enabled and reference_model is None):
        return None
    if zero3(policy):
        inner = unwrap(policy)
        return Reference.separate(reload(), inner.chunk_size, inner.bf16)
    return Reference.frozen_copy(policy)


def for_training(
    cfg,
    policy: nn.Module,
    reference_model: nn.Module | None = None,
    frozen: Reference | None = None,
    accelerator=None,
) -> Reference:
    """The live reference of a run: a separate network when the session loaded one (model.reference, or
    the starting adapter of model.adapter), else the policy with its adapters off (LoRA) or `frozen`, the
    copy of its start that frozen_start took (full fine-tuning). A separate network is sharded like the
    policy when Accelerate shards it (FSDP2)."""
    inner = unwrap(policy)
    device = next(inner.parameters()).device
    if reference_model is not None:
        ref = Reference.separate(reference_model.to(device), inner.chunk_size, inner.bf16)
    elif cfg.lora.enabled:
        return Reference.adapters_off(policy)
    elif frozen is None:
        raise ValueError("full fine-tuning's live reference is the copy frozen_start takes before prepare")
    else:
        ref = frozen
        ref.network.to(device)
    if accelerator is not None:
        ref.network = shard_like(accelerator, ref.network)
    return ref


def cache_settings(cfg, device_type: str, attention: str, chunk_size: int) -> dict:
    """Everything besides the weights and the batch that changes reference log-probs by even one ulp.
    `chunk_size`: the LM-head chunk the reference network runs (train.logps_chunk_size, but one chunk
    under ZeRO-3: sharding.one_head_call)."""
    t = cfg.train
    return {
        "ld_alpha": cfg.loss.ld_alpha,
        "bf16": t.bf16,
        "attn": cfg.model.attn_implementation,
        "fast_fp32_matmul": t.fast_fp32_matmul,
        "prefix_sharing": t.prefix_sharing,
        "packing": t.packing,
        "pack_tokens": t.pack_tokens,
        "attention": attention,
        "logps_chunk_size": chunk_size,
        "device": device_type,
        "torch": torch.__version__,
    }


def precomputed(
    cfg,
    policy: nn.Module,
    splits: dict,
    attention: str,
    token_weights=None,
    progress: bool = True,
    reference_model: nn.Module | None = None,
    accelerator=None,
) -> tuple[dict, dict]:
    """Cached references for each split, computed from the policy before its first update (or from
    `reference_model`, see for_training).

    `splits`: name -> (examples, micro-batches as example-index lists, collate(indices) -> batch). Returns
    (name -> Reference, name -> counts) plus "cache" -> the folder in the counts.
    """
    from pathlib import Path

    from dpokit import models
    from dpokit.refcache import ShardStore, cache_folder, precompute, weights_fingerprint

    # Each process fills its own micro-batches, some from the cache: through a DDP wrapper every forward would
    # be a collective (it broadcasts buffers), and processes with different cache hits would wait forever.
    # A DDP replica holds all the weights, so the module it wraps computes the same numbers alone. Sharded
    # weights (FSDP2) need every process in every forward: they run in lockstep, the extra ones discarded.
    local = unwrap(policy) if isinstance(policy, torch.nn.parallel.DistributedDataParallel) else policy
    device = next(unwrap(policy).parameters()).device
    if reference_model is not None:
        start = for_training(cfg, local, reference_model, accelerator=accelerator)
        key = weights_fingerprint(reference_model, adapters=True)
    else:
        start = Reference.adapters_off(local) if cfg.lora.enabled else Reference.initial(local)
        key = weights_fingerprint(unwrap(policy).model)
    root = Path(cfg.train.ref_cache_dir) if cfg.train.ref_cache_dir else models.cache_dir() / "ref-logps"
    settings = cache_settings(cfg, device.type, attention, unwrap(start.network).chunk_size)
    store = ShardStore(cache_folder(root, key, settings))
    refs, stats = {}, {"cache": str(store.folder)}
    step = functools.partial(lockstep, module=start.network)
    for name, (examples, batches, collate) in splits.items():
        table, stats[name] = precompute(
            start,
            batches,
            examples,
            collate,
            store,
            token_weights,
            f"reference log-probs ({name})",
            progress,
            step,
        )
        refs[name] = Reference.cached(table)
    return refs, stats
