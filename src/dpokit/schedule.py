"""Which pairs each optimizer step trains on: a function of the config and the step alone, so a resumed
run replays nothing and the reference cache knows in advance which micro-batches a run will visit."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from dpokit.config import TrainConfig


def epoch_micro_batches(num_pairs: int, tc: TrainConfig, world: int) -> int:
    """Micro-batches used per epoch: all of them with one process; a multiple of `world` with several."""
    n = math.ceil(num_pairs / tc.batch_size)
    return n - n % world if world > 1 else n


def epoch_steps(num_pairs: int, tc: TrainConfig, world: int = 1) -> int:
    return math.ceil(epoch_micro_batches(num_pairs, tc, world) / (tc.grad_accum * world))


def prompt_groups(examples: list) -> list[list[int]]:
    """Indices of the examples that share a prompt (token ids), in order of first appearance."""
    groups: dict[tuple, list[int]] = {}
    for i, e in enumerate(examples):
        groups.setdefault(tuple(e.prompt_ids), []).append(i)
    return list(groups.values())


def step_schedule(
    num_pairs: int, tc: TrainConfig, world: int = 1, groups: list[list[int]] | None = None
) -> Iterator[list[list[int]]]:
    """Pair indices of every optimizer step, for all processes: grad_accum x world micro-batches of
    batch_size pairs; process r takes micro-batches r, r + world, ... (`mine`).

    Each epoch is a fresh seeded permutation (of the `groups`, kept together, when given: with one pair per
    group it is the same order); a step never spans two epochs. With one process the last step of an epoch
    may be short; with several, an epoch's micro-batches that cannot give every process one are left out,
    so no process waits on a collective the others never reach.
    """
    per_step = tc.grad_accum * world
    total = tc.max_steps or math.ceil(tc.epochs * epoch_steps(num_pairs, tc, world))
    emitted, epoch = 0, 0
    while emitted < total:
        generator = torch.Generator().manual_seed(tc.seed + epoch)
        if groups is None:
            order = torch.randperm(num_pairs, generator=generator).tolist()
        else:
            order = [i for g in torch.randperm(len(groups), generator=generator).tolist() for i in groups[g]]
        micro = [order[i : i + tc.batch_size] for i in range(0, num_pairs, tc.batch_size)]
        micro = micro[: epoch_micro_batches(num_pairs, tc, world)]
        for i in range(0, len(micro), per_step):
            if emitted == total:
                return
            yield micro[i : i + per_step]
            emitted += 1
        epoch += 1


def mine(micro_batches: list[list[int]], rank: int, world: int) -> list[list[int]]:
    """The micro-batches of one step that process `rank` runs."""
    return micro_batches[rank::world]
