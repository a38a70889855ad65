"""Reference log-probs computed once, before training, and kept on disk (`train.precompute_ref`).

Only the micro-batches a run's schedule will visit are computed (and, for evaluation, the eval batches),
each exactly as the loop would compute it live: the same batch, layout and kernels, so a cached run gives
the same numbers as a live one, with a cold cache or a warm one. A longer or resumed run looks up what an
earlier run stored and computes only the rest.

On disk: ROOT/<key>/<shard>.safetensors, where <key> hashes the reference weights and every setting that
changes the numbers (layout, precision, attention, LD-DPO's alpha, ...), and each shard entry is named by
the hash of one micro-batch's token ids. Shards are written atomically every FLUSH_EVERY batches, so a run
killed during the pass keeps what it computed.
"""

from __future__ import annotations

import hashlib
import logging
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from dpokit.batching import Batch
from dpokit.progress import Progress
from dpokit.sharding import whole

log = logging.getLogger(__name__)
CACHE_VERSION = "4"
FLUSH_EVERY = 64


def weights_fingerprint(model: nn.Module, adapters: bool = False) -> str:
    """Hash of every parameter and buffer (names and bytes) of the reference weights; LoRA weights count
    only with `adapters` (a reference that runs them: the starting adapter of model.adapter)."""
    h = hashlib.blake2b(digest_size=16)
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if "lora_" in name and not adapters:  # adapters are off in the reference
            continue
        # the same weights give the same key with or without a PEFT wrapper
        name = name.removeprefix("base_model.model.").replace(".base_layer", "")
        t = whole(tensor.detach()).cpu().contiguous()  # a shard's whole tensor: every process, one key
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.view(torch.uint8).numpy() if t.numel() else b"")  # the buffer itself, no copy
    return h.hexdigest()


def cache_folder(root: Path, weights_key: str, settings: dict) -> Path:
    parts = [CACHE_VERSION, weights_key, repr(sorted(settings.items()))]
    return Path(root) / hashlib.sha256("|".join(parts).encode()).hexdigest()[:24]


def batch_key(examples: list) -> str:
    """Hash of the token ids of one micro-batch's pairs, in order (and their trained-token masks, when a
    completion has some)."""
    h = hashlib.blake2b(digest_size=16)
    for e in examples:
        masks = (e.chosen_targets, e.rejected_targets)
        h.update(
            repr((e.prompt_ids, e.chosen_ids, e.rejected_ids, *([masks] if any(masks) else []))).encode()
        )
    return h.hexdigest()


class ShardStore:
    """The entries of one cache folder: name -> (2P,) tensor, read lazily from its shard files."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        self.folder = folder
        self.index: dict[str, Path] = {}
        for shard in sorted(folder.glob("*.safetensors")) if folder.is_dir() else []:
            with safe_open(str(shard), framework="pt") as f:
                self.index.update(dict.fromkeys(f.keys(), shard))

    def get(self, name: str) -> torch.Tensor | None:
        from safetensors import safe_open

        shard = self.index.get(name)
        if shard is None:
            return None
        with safe_open(str(shard), framework="pt") as f:
            return f.get_tensor(name)

    def write(self, entries: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        if not entries:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        shard = self.folder / f"{uuid.uuid4().hex}.safetensors"
        tmp = shard.with_suffix(f".{os.getpid()}.tmp")  # several processes may write at once
        save_file({k: v.contiguous() for k, v in entries.items()}, str(tmp))
        tmp.replace(shard)
        self.index.update(dict.fromkeys(entries, shard))


@dataclass
class CachedLogps:
    """Reference log-probs of the micro-batches of one split, by the example ids of the batch."""

    rows: dict[tuple[int, ...], torch.Tensor] = field(default_factory=dict)

    def lookup(self, batch: Batch) -> torch.Tensor:
        if batch.example_ids is None:
            raise ValueError("a cached reference needs batches built with example ids")
        key = tuple(batch.example_ids.tolist())
        if key not in self.rows:
            raise KeyError(
                f"no precomputed reference log-probs for the micro-batch of examples {list(key)[:8]}"
            )
        return self.rows[key].to(batch.input_ids.device)


def precompute(
    reference,
    batches: list[list[int]],
    examples: list,
    collate: Callable[[list[int]], Batch],
    store: ShardStore,
    token_weights: Callable[[Batch], torch.Tensor] | None = None,
    label: str = "reference log-probs",
    progress: bool = True,
    lockstep: Callable[[int], int] | None = None,
) -> tuple[CachedLogps, dict]:
    """Reference log-probs of each micro-batch (lists of example indices), from `store` or computed and
    stored. Returns the table and counts: batches, pairs, computed and reused (batches).

    `lockstep(n)`, for a reference whose forwards are collectives (sharded weights): the number of
    forwards every process runs, given that this one has `n` to compute; the extra ones recompute a batch
    and drop it."""
    table, todo = CachedLogps(), {}  # todo: key -> a batch of it to compute, in order
    stats = {"batches": 0, "pairs": 0, "computed": 0, "reused": 0}
    for indices in batches:
        ids = tuple(indices)
        if ids in table.rows:
            continue
        name = batch_key([examples[i] for i in indices])
        if name in todo:  # the same pairs again: computed once
            todo[name].append(ids)
            stats["reused"] += 1
        elif (values := store.get(name)) is None:
            todo[name] = [ids]
        else:
            table.rows[ids] = values
            stats["reused"] += 1
        stats["batches"] += 1
        stats["pairs"] += len(indices)
    rounds = lockstep(len(todo)) if lockstep else len(todo)
    work = list(todo.items())
    pending = {}  # computed, not yet on disk
    with Progress(label, total=sum(len(ids[0]) for _, ids in work), unit="pairs", enabled=progress) as bar:
        for r in range(rounds):
            spare = r >= len(work)  # this process is done; the others still need it in their forwards
            name, same = work[r] if not spare else (None, [batches[0]] if batches else [])
            if not same:
                raise RuntimeError("a process without batches cannot join the others' forwards")
            batch = collate(list(same[0]))
            weights = token_weights(batch) if token_weights else None
            values = reference.sequence_logps(batch, weights).float().cpu()
            if spare:
                continue
            pending[name] = values
            for ids in same:
                table.rows[ids] = values
            stats["computed"] += 1
            bar.advance(len(same[0]))
            if len(pending) == FLUSH_EVERY:
                store.write(pending)
                pending = {}
    store.write(pending)
    return table, stats
