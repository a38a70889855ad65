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


class MetricsWriter:
    """Appends one JSON record per line to RUN_DIR/metrics.jsonl (flushed each time), and passes it to
    the Accelerate trackers when given an accelerator with trackers (`Accelerator.log` runs on rank 0)."""

    def __init__(self, path: Path | None, accelerator=None):
        """`path` None: write nothing (processes other than rank 0)."""
        self.path = path
        self.accelerator = accelerator
        self.fh = open(path, "a", encoding="utf-8") if path else None  # noqa: SIM115 - closed by close()

    def write(self, record: dict) -> None:
        if self.fh:
            self.fh.write(json.dumps(record) + "\n")
            self.fh.flush()
        if self.accelerator is not None:
            self.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def close(self) -> None:
        if self.fh:
            self.fh.close()


def read_metrics(path: Path) -> list[dict]:
    """Every record of a JSONL file (metrics.jsonl, pair_samples.jsonl, eval_samples.jsonl)."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def write_jsonl(path: Path, rows) -> None:
    """Replace `path` with one JSON record per line (UTF-8, non-ASCII kept)."""
    Path(path).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def _fmt(record: dict, key: str, spec: str) -> str:
    """A metric for the console, or `-` when the step could not define it (e.g. a KTO step of one label)."""
    value = record.get(key)
    return "-" if value is None or not math.isfinite(value) else format(value, spec)


class StepReporter:
    """Progress bar with the live loss and margin, plus one printed line per step and per evaluation.

    A metric a step cannot define (the margin and accuracy of a KTO step whose examples share one label) is
    shown as `-`, never as nan."""

    def __init__(self, total_steps: int, enabled: bool = True, done: int = 0):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.enabled = enabled
        self.console = Console(stderr=True, width=max(Console(stderr=True).width, 120))
        self.progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]} margin {task.fields[margin]}"),
            TimeRemainingColumn(),
            console=self.console,
            disable=not enabled,
        )
        self.task = self.progress.add_task("train", total=total_steps, completed=done, loss="-", margin="-")

    def __enter__(self):
        self.progress.start()
        return self

    def __exit__(self, *exc):
        self.progress.stop()

    def update(self, record: dict) -> None:
        self.progress.update(
            self.task,
            advance=1,
            loss=_fmt(record, "loss", ".4f"),
            margin=_fmt(record, "rewards/margins", "+.4f"),
        )
        if self.enabled:
            acc = (
                f" acc {_fmt(record, 'rewards/accuracies', '.2f')}" if "rewards/accuracies" in record else ""
            )
            self.console.print(
                f"step {record['step']:>4} loss {_fmt(record, 'loss', '.4f')} "
                f"r+ {_fmt(record, 'rewards/chosen', '+.3f')} r- {_fmt(record, 'rewards/rejected', '+.3f')} "
                f"margin {_fmt(record, 'rewards/margins', '+.3f')}{acc} "
                f"lr {record['lr']:.1e} |g| {record['grad_norm']:.2f} {record['tokens_per_s']:.0f} tok/s",
                highlight=False,
            )

    def print_eval(self, step: int, record: dict | None) -> None:
        if self.enabled and record and "eval/loss" in record:
            acc = (
                f"  accuracy {_fmt(record, 'eval/rewards/accuracies', '.3f')}"
                if "eval/rewards/accuracies" in record
                else ""
            )
            self.console.print(
                f"[bold]eval @ step {step}[/bold]  loss {_fmt(record, 'eval/loss', '.4f')}  "
                f"margin {_fmt(record, 'eval/rewards/margins', '+.4f')}{acc}",
                highlight=False,
            )
