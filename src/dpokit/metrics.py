"""Per-step metrics: sums over every micro-batch (and every rank), divided once per optimizer step."""

from __future__ import annotations

import torch

from dpokit.losses import LossOutput

PAIR_KEYS = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
)


class PairMetrics:
    """Accumulates sums and counts of the preference metrics over micro-batches.

    Paired losses give one chosen and one rejected reward per pair (margins and accuracies per pair);
    unpaired ones (KTO) give rewards for the desirable and undesirable examples separately, and the
    margin is then the difference of the two means. Any extra per-example tensor (log-probs, drift)
    is averaged the same way.
    """

    def __init__(self):
        # sums stay on the device (detached, float64): no host sync per metric per micro-batch
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def _add(self, key: str, values: torch.Tensor) -> None:
        total = values.detach().double().sum()
        self.sums[key] = self.sums[key] + total if key in self.sums else total
        self.counts[key] = self.counts.get(key, 0) + values.numel()

    def add(self, out: LossOutput, extras: dict[str, torch.Tensor]) -> None:
        self._add("loss", out.losses)
        self._add("rewards/chosen", out.chosen_rewards)
        self._add("rewards/rejected", out.rejected_rewards)
        if (
            out.chosen_rewards.shape == out.rejected_rewards.shape
            and out.chosen_rewards.numel() == out.losses.numel()
        ):
            margins = out.chosen_rewards - out.rejected_rewards
            self._add("rewards/margins", margins)
            self._add("rewards/accuracies", (margins > 0).float())
        for key, values in extras.items():
            self._add(key, values)

    @property
    def pairs(self) -> int:
        return self.counts.get("loss", 0)

    def compute(self, accelerator=None, prefix: str = "") -> dict[str, float]:
        """Means per example, summed over every process first when `accelerator` runs several.

        A process may have seen no example of a kind (or no eval batch at all), so the keys are the union
        over processes and a missing one counts as 0 / 0 there.
        """
        keys = sorted(self.sums)
        distributed = accelerator is not None and accelerator.num_processes > 1
        if distributed:
            from accelerate.utils import gather_object

            keys = sorted({k for ks in gather_object([keys]) for k in ks})
        device = accelerator.device if accelerator is not None else "cpu"
        zero = torch.zeros((), dtype=torch.float64, device=device)
        sums = [self.sums[k].to(device) if k in self.sums else zero for k in keys]
        counts = torch.tensor(
            [float(self.counts.get(k, 0)) for k in keys], dtype=torch.float64, device=device
        )
        totals = torch.cat([torch.stack(sums), counts]) if keys else counts
        if distributed:
            totals = accelerator.reduce(totals, reduction="sum")
        values = totals.tolist()  # the one host sync of the step
        n = len(keys)
        means = {k: s / c for k, s, c in zip(keys, values[:n], values[n:], strict=True) if c > 0}
        if "rewards/margins" not in means and "rewards/chosen" in means and "rewards/rejected" in means:
            means["rewards/margins"] = means["rewards/chosen"] - means["rewards/rejected"]
        ordered = [k for k in PAIR_KEYS if k in means] + [k for k in sorted(means) if k not in PAIR_KEYS]
        return {prefix + k: means[k] for k in ordered}
