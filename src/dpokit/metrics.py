"""Per-step metrics: sums over every micro-batch (and every rank), divided once per optimizer step."""

from __future__ import annotations

import json
import math
from pathlib import Path

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
    """Accumulates per-pair sums of the standard preference metrics over micro-batches."""

    def __init__(self):
        self.sums = torch.zeros(len(PAIR_KEYS), dtype=torch.float64)
        self.pairs = 0

    def add(self, out: LossOutput, policy_chosen: torch.Tensor, policy_rejected: torch.Tensor) -> None:
        margins = out.chosen_rewards - out.rejected_rewards
        values = torch.stack(
            [
                out.losses.detach().sum(),
                out.chosen_rewards.sum(),
                out.rejected_rewards.sum(),
                margins.sum(),
                (margins > 0).float().sum(),
                policy_chosen.detach().sum(),
                policy_rejected.detach().sum(),
            ]
        )
        self.sums += values.double().cpu()
        self.pairs += out.losses.shape[0]

    def compute(self, reduce=None, prefix: str = "") -> dict[str, float]:
        """Means per pair. `reduce` sums a tensor over ranks (e.g. accelerator.reduce with 'sum')."""
        totals = torch.cat([self.sums, torch.tensor([float(self.pairs)], dtype=torch.float64)])
        if reduce is not None:
            totals = reduce(totals)
        n = totals[-1].item()
        return {prefix + k: (v / n if n else math.nan) for k, v in zip(PAIR_KEYS, totals[:-1].tolist(), strict=True)}


class MetricsWriter:
    """Appends one JSON record per line to RUN_DIR/metrics.jsonl (flushed each time)."""

    def __init__(self, path: Path):
        self.path = path
        self.fh = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed by close()

    def write(self, record: dict) -> None:
        self.fh.write(json.dumps(record) + "\n")
        self.fh.flush()

    def close(self) -> None:
        self.fh.close()


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


class StepReporter:
    """Progress bar with the live loss and margin, plus one printed line per step and per evaluation."""

    def __init__(self, total_steps: int, enabled: bool = True):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.enabled = enabled
        self.console = Console(stderr=True, width=max(Console(stderr=True).width, 120))
        self.progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f} margin {task.fields[margin]:+.4f}"),
            TimeRemainingColumn(),
            console=self.console,
            disable=not enabled,
        )
        self.task = self.progress.add_task("train", total=total_steps, loss=math.nan, margin=math.nan)

    def __enter__(self):
        self.progress.start()
        return self

    def __exit__(self, *exc):
        self.progress.stop()

    def update(self, record: dict) -> None:
        self.progress.update(self.task, advance=1, loss=record["loss"], margin=record["rewards/margins"])
        if self.enabled:
            self.console.print(
                f"step {record['step']:>4} loss {record['loss']:.4f} "
                f"r+ {record['rewards/chosen']:+.3f} r- {record['rewards/rejected']:+.3f} "
                f"margin {record['rewards/margins']:+.3f} acc {record['rewards/accuracies']:.2f} "
                f"lr {record['lr']:.1e} |g| {record['grad_norm']:.2f} {record['tokens_per_s']:.0f} tok/s",
                highlight=False,
            )

    def print_eval(self, step: int, record: dict | None) -> None:
        if self.enabled and record and "eval/loss" in record:
            self.console.print(
                f"[bold]eval @ step {step}[/bold]  loss {record['eval/loss']:.4f}  "
                f"margin {record['eval/rewards/margins']:+.4f}  accuracy {record['eval/rewards/accuracies']:.3f}",
                highlight=False,
            )
