"""Weights between two points of training: theta(lambda) = theta0 + lambda (theta - theta0).

WARP's LITI (Rame et al. 2024, arXiv:2406.16768, "linear interpolation towards initialization") moves a
trained policy back toward the model it started from: lambda = 0 is the start, 1 the policy; between them
the reward falls more slowly than the KL, so one run gives a whole reward-KL curve for the price of sampling.
lambda > 1 extrapolates past the policy (ExPO, Zheng et al. 2024, arXiv:2404.16792).

- `Interpolation`: a loaded policy set to any lambda in place, and back. LoRA: theta - theta0 is each adapted
  layer's delta s * B @ A, so lambda scales every LoRA layer's scaling (exact, nothing copied); full
  fine-tuning: each parameter becomes torch.lerp(theta0, theta, lambda) from a copy of both (exact at 0 and 1).
- `between`: the same lerp on two saved states, tensor by tensor (`iterate.kl_budget` pulls a round back
  toward the round before it with it). On LoRA adapters this interpolates A and B each: exact at both
  ends, and where the earlier state has B = 0 (a new adapter: the initial model) it equals scaling by lambda.
"""

from __future__ import annotations

import torch

from dpokit.errors import UsageError


class Interpolation:
    """A policy (`model`) that can be set to theta0 + lambda (theta - theta0). `start`: the parameters of
    theta0 by name (full fine-tuning), or None for a LoRA policy whose theta0 is its base (adapters off)."""

    def __init__(self, model, start: dict[str, torch.Tensor] | None):
        self.model = model
        self.lam = 1.0
        if start is None:
            self.layers = [m for m in model.modules() if hasattr(m, "lora_A") and isinstance(m.scaling, dict)]
            if not self.layers:
                raise UsageError("interpolation: the policy has no LoRA layers and no starting weights")
            self.scaling = [dict(m.scaling) for m in self.layers]
            return
        self.params = dict(model.named_parameters())
        missing = sorted(set(self.params) - set(start))
        wrong = [n for n in self.params if n in start and start[n].shape != self.params[n].shape]
        if missing or wrong:
            raise UsageError(
                f"interpolation: the starting model does not match the policy (missing {missing[:3]}, other "
                f"shapes {wrong[:3]})"
            )
        self.end = {n: p.detach().clone() for n, p in self.params.items()}
        self.start = {n: start[n].detach().to(p.device, p.dtype) for n, p in self.params.items()}

    @property
    def is_lora(self) -> bool:
        return not hasattr(self, "params")

    @torch.no_grad()
    def set(self, lam: float) -> None:
        """Put the policy at `lam` (0: the start, 1: as trained; >1 extrapolates)."""
        lam = float(lam)
        if not lam >= 0:
            raise UsageError(f"interpolation: lambda={lam} must be 0 or more (0 = the start, 1 = the policy)")
        if self.is_lora:
            for layer, scaling in zip(self.layers, self.scaling, strict=True):
                layer.scaling.update({name: value * lam for name, value in scaling.items()})
        else:
            for name, p in self.params.items():
                p.copy_(torch.lerp(self.start[name], self.end[name], lam))
        self.lam = lam


def between(start: dict[str, torch.Tensor], end: dict[str, torch.Tensor], lam: float) -> dict:
    """start + lam (end - start) for every tensor of two states with the same names (torch.lerp: exact at 0
    and 1)."""
    if set(start) != set(end):
        raise UsageError(f"interpolation: the states differ in names ({sorted(set(start) ^ set(end))[:3]})")
    return {name: torch.lerp(start[name].float(), end[name].float(), lam).to(end[name].dtype) for name in end}
