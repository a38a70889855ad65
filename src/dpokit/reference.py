"""The reference policy pi_ref, handled in one place: always under no_grad, always with dropout off.

Strategies (each has `sequence_logps(batch, token_weights=None) -> (S,)`):
- `PolicyReference`: LoRA training; the same network with the adapters switched off (no second copy);
- `FrozenCopyReference`: full fine-tuning; a frozen copy of the starting weights;
- `ModelReference`: a separate model given as the reference (evaluation of a saved policy);
- `CachedReference`: log-probs precomputed once before training (`train.precompute_ref`) and looked up by
  example id; stored on disk under a key of the model weights, the tokenized data and the settings that
  change the numbers, so a matching key reuses the file and anything else recomputes it. Full
  fine-tuning with a cache holds no second copy of the model at all.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import os
from pathlib import Path

import torch
from torch import nn

from dpokit.batching import Batch
from dpokit.logps import CompletionLogps, sum_by_sequence

log = logging.getLogger(__name__)
CACHE_VERSION = "1"


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


def _sum(tok: torch.Tensor, batch: Batch, token_weights: torch.Tensor | None) -> torch.Tensor:
    return sum_by_sequence(tok if token_weights is None else tok * token_weights, batch.seq_index, batch.num_seqs)


class PolicyReference:
    """pi_ref = the trained network itself, with its LoRA adapters switched off (`adapters_off`), or as it
    is: valid only before its first update (used to fill the cache in full fine-tuning without a copy)."""

    def __init__(self, policy: nn.Module, adapters_off: bool = True):
        self.policy, self.adapters_off = policy, adapters_off

    @torch.no_grad()
    def sequence_logps(self, batch: Batch, token_weights: torch.Tensor | None = None) -> torch.Tensor:
        off = unwrap(self.policy).model.disable_adapter() if self.adapters_off else contextlib.nullcontext()
        with eval_mode(self.policy), off:
            return _sum(self.policy(*batch.model_args), batch, token_weights)


class ModelReference:
    """pi_ref = a separate frozen model (e.g. the SFT checkpoint when evaluating a trained policy)."""

    def __init__(self, model: CompletionLogps):
        self.frozen = model
        self.frozen.eval().requires_grad_(False)

    @torch.no_grad()
    def sequence_logps(self, batch: Batch, token_weights: torch.Tensor | None = None) -> torch.Tensor:
        return _sum(self.frozen(*batch.model_args), batch, token_weights)


class FrozenCopyReference(ModelReference):
    """pi_ref = a frozen copy of the policy, taken before any update."""

    def __init__(self, policy: nn.Module):
        inner = unwrap(policy)
        super().__init__(CompletionLogps(copy.deepcopy(inner.model), inner.chunk_size, inner.bf16))


class CachedReference:
    """pi_ref log-probs looked up by example id: `table` is (num_examples, 2) = (chosen, rejected)."""

    def __init__(self, table: torch.Tensor):
        self.table = table

    def sequence_logps(self, batch: Batch, token_weights: torch.Tensor | None = None) -> torch.Tensor:
        if batch.example_ids is None:
            raise ValueError("a cached reference needs batches built with example ids")
        rows = self.table[batch.example_ids.cpu()].to(batch.input_ids.device)  # (P, 2)
        return torch.cat([rows[:, 0], rows[:, 1]])  # chosen sequences first, then rejected


@torch.no_grad()
def precompute_table(reference, examples: list, collate, pad_id: int, batch_size: int, device, token_weights_fn=None):
    """(N, 2) reference log-probs of every pair, in example order."""
    out = []
    for start in range(0, len(examples), batch_size):
        stop = min(start + batch_size, len(examples))
        batch = collate(examples[start:stop], pad_id, ids=list(range(start, stop))).to(device)
        weights = token_weights_fn(batch) if token_weights_fn else None
        seq = reference.sequence_logps(batch, weights).float().cpu()
        P = batch.num_pairs
        out.append(torch.stack([seq[:P], seq[P:]], dim=1))
    return torch.cat(out) if out else torch.zeros(0, 2)


def weights_fingerprint(model: nn.Module) -> str:
    """Hash of every parameter and buffer (names and bytes) of the reference weights."""
    h = hashlib.blake2b(digest_size=16)
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if "lora_" in name:  # adapters are off in the reference
            continue
        # the same weights give the same key with or without a PEFT wrapper
        name = name.removeprefix("base_model.model.").replace(".base_layer", "")
        t = tensor.detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.view(torch.uint8).numpy() if t.numel() else b"")  # the buffer itself, no copy
    return h.hexdigest()


def examples_fingerprint(examples: list) -> str:
    h = hashlib.blake2b(digest_size=16)
    for e in examples:
        h.update(repr((e.prompt_ids, e.chosen_ids, e.rejected_ids)).encode())
    return h.hexdigest()


def cache_key(weights: str, examples: list, settings: dict) -> str:
    parts = [CACHE_VERSION, weights, examples_fingerprint(examples), repr(sorted(settings.items()))]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:24]


def load_or_compute(path: Path, compute) -> tuple[torch.Tensor, bool]:
    """Read the cached table at `path`, or compute and write it atomically. Returns (table, reused)."""
    from safetensors.torch import load_file, save_file

    if path.exists():
        return load_file(str(path))["ref_logps"], True
    table = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")  # several processes may fill the same entry at once
    save_file({"ref_logps": table.contiguous()}, str(tmp))
    tmp.replace(path)
    return table, False
