"""Preference losses: pure functions of per-sequence log-probs, chosen from a registry.

Every loss takes a `PairLogps` (per-pair tensors, shape (P,)) and keyword hyper-parameters, and returns a
`LossOutput` of per-pair losses and detached implicit rewards. Imports only torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class PairLogps:
    policy_chosen: torch.Tensor
    """(P,) log pi_theta(y_w | x), summed over completion tokens."""
    policy_rejected: torch.Tensor
    """(P,) log pi_theta(y_l | x)."""
    ref_chosen: torch.Tensor | None = None
    """(P,) log pi_ref(y_w | x); None for reference-free losses."""
    ref_rejected: torch.Tensor | None = None
    chosen_lengths: torch.Tensor | None = None
    """(P,) completion token counts."""
    rejected_lengths: torch.Tensor | None = None


@dataclass
class LossOutput:
    losses: torch.Tensor
    """(P,) per-pair loss (differentiable)."""
    chosen_rewards: torch.Tensor
    """(P,) implicit reward of the chosen completion (detached)."""
    rejected_rewards: torch.Tensor
    """(P,) implicit reward of the rejected completion (detached)."""


@dataclass(frozen=True)
class LossSpec:
    fn: Callable[..., LossOutput]
    params: tuple[str, ...]
    """Names of the `loss.*` config fields the function takes as keyword arguments."""
    needs_reference: bool = True


def _dpo_rewards(x: PairLogps, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    return (
        beta * (x.policy_chosen - x.ref_chosen).detach(),
        beta * (x.policy_rejected - x.ref_rejected).detach(),
    )


def sigmoid(x: PairLogps, *, beta: float, label_smoothing: float = 0.0) -> LossOutput:
    """DPO (arXiv:2305.18290, eq. 7); with label_smoothing eps > 0, conservative DPO (cDPO).

        h = (log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l))
        L = -(1 - eps) * log sigmoid(beta * h) - eps * log sigmoid(-beta * h)

    At initialization (pi = pi_ref) h = 0 and L = ln 2 whatever eps.
    """
    h = (x.policy_chosen - x.ref_chosen) - (x.policy_rejected - x.ref_rejected)
    losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    return LossOutput(losses, *_dpo_rewards(x, beta))


LOSSES: dict[str, LossSpec] = {
    "sigmoid": LossSpec(sigmoid, ("beta", "label_smoothing")),
}


def compute_loss(name: str, x: PairLogps, params: dict) -> LossOutput:
    """Run loss `name` with the hyper-parameters it declares, picked from `params` (the loss config)."""
    spec = LOSSES[name]
    return spec.fn(x, **{k: params[k] for k in spec.params})
