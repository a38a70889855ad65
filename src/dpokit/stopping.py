"""Stop requests while a run goes on: SIGINT (Ctrl-C) and SIGTERM (what schedulers send before they kill a
job) are noted, not obeyed at once, so the run can finish its step and save a resumable checkpoint; a second
signal stops at once (KeyboardInterrupt). Used by the training loop and the rounds."""

from __future__ import annotations

import logging
import signal
import threading

log = logging.getLogger(__name__)
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    """`with StopSignals("finishing step ...") as stop: ... if stop.received: ...`. Outside the main thread
    (where Python cannot take signals) it notes nothing and changes nothing."""

    def __init__(self, doing: str):
        self.doing = doing
        self.received: int | None = None
        self.previous: dict = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}

    def _handle(self, signum, frame) -> None:
        if self.received is not None:  # the second one: stop now
            self.__exit__()
            raise KeyboardInterrupt
        self.received = signum
        name = signal.Signals(signum).name
        log.warning("%s received: %s; send it again to stop at once (unsaved work is lost)", name, self.doing)

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received else ""
