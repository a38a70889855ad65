"""Progress of the long phases (training steps, the reference pass, evaluation, sampling), shown where the
user is:

- a terminal: a live bar (rich) with the count, the elapsed time and an ETA; training also prints one line
  per step and per evaluation;
- a Jupyter notebook (or Colab): one HTML block per phase, updated in place (a bar, the count, the ETA and,
  for training, the latest step's and evaluation's numbers), never a line per update;
- a file or a pipe: a log line at a steady interval (`DPOKIT_PROGRESS_INTERVAL` seconds, default 30; 0 =
  every update) and one when the phase ends; training prints its step and evaluation lines.
"""

from __future__ import annotations

import html
import logging
import math
import os
import sys
import time

log = logging.getLogger("dpokit.progress")
INTERVAL_ENV = "DPOKIT_PROGRESS_INTERVAL"
NOTEBOOK_REFRESH_S = 0.2
"""Least time between two redraws of a notebook's block (the last state is always drawn)."""


def in_notebook() -> bool:
    """Running in a Jupyter kernel (a notebook, JupyterLab, VS Code, Colab), whose output shows HTML."""
    shell = sys.modules.get("IPython")
    if shell is None:
        return False
    ip = shell.get_ipython()
    return ip is not None and (type(ip).__name__ == "ZMQInteractiveShell" or "google.colab" in str(type(ip)))


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return (
        f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
        if seconds >= 3600
        else f"{seconds // 60}:{seconds % 60:02d}"
    )


def _eta(done: int, total: int, elapsed: float) -> str:
    rate = done / elapsed if elapsed > 0 else 0.0
    return _clock((total - done) / rate) if 0 < done < total and rate > 0 else ""


class NotebookBlock:
    """One HTML block in a notebook's output, redrawn in place (IPython's display handle: no widgets)."""

    def __init__(self):
        from IPython.display import HTML, display

        self._html = HTML
        self.handle = display(HTML(""), display_id=True)
        self.drawn = 0.0

    def draw(self, label: str, done: int, total: int, started: float, lines=(), force: bool = False) -> None:
        now = time.perf_counter()
        if not force and now - self.drawn < NOTEBOOK_REFRESH_S:
            return
        self.drawn = now
        elapsed = now - started
        eta = _eta(done, total, elapsed)
        text = f"{done}/{total} &middot; {_clock(elapsed)} elapsed" + (f" &middot; eta {eta}" if eta else "")
        rows = "".join(f"<div><code>{html.escape(line)}</code></div>" for line in lines)
        self.handle.update(
            self._html(
                f'<div class="dpokit-progress"><b>{html.escape(label)}</b> '
                f'<progress value="{done}" max="{max(total, 1)}" style="width:40%"></progress> {text}{rows}</div>'
            )
        )


class Progress:
    """`with Progress("evaluation", total=N, unit="pairs") as p: ... p.advance(k)`."""

    def __init__(self, label: str, total: int, unit: str = "", enabled: bool = True):
        self.label, self.total, self.unit, self.enabled = label, total, unit, enabled and total > 0
        self.done = 0
        self.interval = float(os.environ.get(INTERVAL_ENV, "30"))
        self.bar = self.block = None
        self.started = self.last_line = 0.0

    def __enter__(self) -> Progress:
        self.started = self.last_line = time.perf_counter()
        if not self.enabled:
            return self
        if in_notebook():
            self.block = NotebookBlock()
            self.block.draw(self.label, 0, self.total, self.started, force=True)
        elif sys.stderr.isatty():
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
            from rich.progress import Progress as Bar

            self.bar = Bar(
                TextColumn(self.label),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn(self.unit),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
            )
            self.task = self.bar.add_task(self.label, total=self.total)
            self.bar.start()
        return self

    def advance(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.advance(self.task, n)
        elif self.block is not None:
            self.block.draw(self.label, self.done, self.total, self.started)
        elif (
            self.enabled and time.perf_counter() - self.last_line >= self.interval and self.done < self.total
        ):
            self._line()

    def _line(self) -> None:
        now = time.perf_counter()
        elapsed = now - self.started
        eta = _eta(self.done, self.total, elapsed)
        log.info(
            "%s: %d/%d %s (%s elapsed%s)",
            self.label,
            self.done,
            self.total,
            self.unit,
            _clock(elapsed),
            f", eta {eta}" if eta else "",
        )
        self.last_line = now

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()
        elif self.block is not None:
            self.block.draw(self.label, self.done, self.total, self.started, force=True)
        elif (
            self.enabled
            and exc[0] is None
            and (self.interval == 0 or time.perf_counter() - self.started >= self.interval)
        ):
            self._line()


def _fmt(record: dict, key: str, spec: str) -> str:
    """A metric for the console, or `-` when the step could not define it (e.g. a KTO step of one label)."""
    value = record.get(key)
    return "-" if value is None or not math.isfinite(value) else format(value, spec)


def step_line(record: dict) -> str:
    acc = f" acc {_fmt(record, 'rewards/accuracies', '.2f')}" if "rewards/accuracies" in record else ""
    return (
        f"step {record['step']:>4} loss {_fmt(record, 'loss', '.4f')} "
        f"r+ {_fmt(record, 'rewards/chosen', '+.3f')} r- {_fmt(record, 'rewards/rejected', '+.3f')} "
        f"margin {_fmt(record, 'rewards/margins', '+.3f')}{acc} "
        f"lr {record['lr']:.1e} |g| {record['grad_norm']:.2f} {record['tokens_per_s']:.0f} tok/s"
    )


def eval_line(step: int, record: dict) -> str:
    acc = (
        f"  accuracy {_fmt(record, 'eval/rewards/accuracies', '.3f')}"
        if "eval/rewards/accuracies" in record
        else ""
    )
    return (
        f"eval @ step {step}  loss {_fmt(record, 'eval/loss', '.4f')}  "
        f"margin {_fmt(record, 'eval/rewards/margins', '+.4f')}{acc}"
    )


class StepReporter:
    """Training's progress: the bar with the live loss and margin, and a line per step and per evaluation
    (a notebook shows the latest of each in its block instead).

    A metric a step cannot define (the margin and accuracy of a KTO step whose examples share one label) is
    shown as `-`, never as nan."""

    def __init__(self, total_steps: int, enabled: bool = True, done: int = 0, log_lines: bool = False):
        """`enabled`: the bar and its lines; else, with `log_lines`, one log line per step and evaluation
        (train.progress=false on the process that reports)."""
        self.enabled, self.total, self.done, self.log_lines = enabled, total_steps, done, log_lines
        self.block = NotebookBlock() if enabled and in_notebook() else None
        self.latest: dict[str, str] = {}
        self.started = time.perf_counter()
        if self.block is None:
            self._terminal(total_steps, done)

    def _terminal(self, total_steps: int, done: int) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.console = Console(stderr=True, width=max(Console(stderr=True).width, 120))
        self.progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]} margin {task.fields[margin]}"),
            TimeRemainingColumn(),
            console=self.console,
            disable=not self.enabled,
        )
        self.task = self.progress.add_task("train", total=total_steps, completed=done, loss="-", margin="-")

    def __enter__(self):
        if self.block is not None:
            self._draw(force=True)
        else:
            self.progress.start()
        return self

    def __exit__(self, *exc):
        if self.block is not None:
            self._draw(force=True)
        else:
            self.progress.stop()

    def _draw(self, force: bool = False) -> None:
        self.block.draw("train", self.done, self.total, self.started, self.latest.values(), force)

    def update(self, record: dict) -> None:
        self.done += 1
        if self.log_lines and not self.enabled:
            log.info(step_line(record))
        if self.block is not None:
            self.latest["step"] = step_line(record)
            self._draw(force=self.done == self.total)
            return
        self.progress.update(
            self.task,
            advance=1,
            loss=_fmt(record, "loss", ".4f"),
            margin=_fmt(record, "rewards/margins", "+.4f"),
        )
        if self.enabled:
            self.console.print(step_line(record), highlight=False)

    def print_eval(self, step: int, record: dict | None) -> None:
        if self.log_lines and not self.enabled and record and "eval/loss" in record:
            log.info(eval_line(step, record))
        if not (self.enabled and record and "eval/loss" in record):
            return
        if self.block is not None:
            self.latest["eval"] = eval_line(step, record)
            self._draw(force=True)
        else:
            self.console.print(eval_line(step, record), highlight=False)
