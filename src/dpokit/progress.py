"""Progress of the long phases (reference pass, evaluation, sampling): on a terminal a live bar with the
count, the elapsed time and an ETA; when output goes to a file or a pipe, a log line at a steady interval
(`DPOKIT_PROGRESS_INTERVAL` seconds, default 30; 0 = every update) and one when the phase ends."""

from __future__ import annotations

import logging
import os
import sys
import time

log = logging.getLogger("dpokit.progress")
INTERVAL_ENV = "DPOKIT_PROGRESS_INTERVAL"


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return (
        f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
        if seconds >= 3600
        else f"{seconds // 60}:{seconds % 60:02d}"
    )


class Progress:
    """`with Progress("evaluation", total=N, unit="pairs") as p: ... p.advance(k)`."""

    def __init__(self, label: str, total: int, unit: str = "", enabled: bool = True):
        self.label, self.total, self.unit, self.enabled = label, total, unit, enabled and total > 0
        self.done = 0
        self.interval = float(os.environ.get(INTERVAL_ENV, "30"))
        self.bar = None
        self.started = self.last_line = 0.0

    def __enter__(self) -> Progress:
        self.started = self.last_line = time.perf_counter()
        if self.enabled and sys.stderr.isatty():
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
        elif (
            self.enabled and time.perf_counter() - self.last_line >= self.interval and self.done < self.total
        ):
            self._line()

    def _line(self) -> None:
        now = time.perf_counter()
        elapsed = now - self.started
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (
            f", eta {_clock((self.total - self.done) / rate)}"
            if 0 < self.done < self.total and rate > 0
            else ""
        )
        log.info(
            "%s: %d/%d %s (%s elapsed%s)", self.label, self.done, self.total, self.unit, _clock(elapsed), eta
        )
        self.last_line = now

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()
        elif (
            self.enabled
            and exc[0] is None
            and (self.interval == 0 or time.perf_counter() - self.started >= self.interval)
        ):
            self._line()
