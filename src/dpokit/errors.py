"""dpokit's exceptions: one base, `DpokitError`, for everything a user can fix (a config key, a record, a
model name, a run dir, a reward). Each message is the one line `dpokit` prints before it exits with code 2;
from Python, catch `dpokit.DpokitError` (or one of its kinds). Each kind also derives from the builtin
exception it refines (ValueError, RuntimeError), so code that caught those keeps working.

Imports nothing: every module may raise these, `dpokit.data` and `dpokit.report` included."""

from __future__ import annotations


class DpokitError(Exception):
    """A problem the user can fix; the message says what, why, and how."""


class ConfigError(DpokitError, ValueError):
    """Every problem found in a config, one per line."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        listed = f" {problems[0]}" if len(problems) == 1 else "\n" + "\n".join(f"  - {p}" for p in problems)
        super().__init__("invalid config:" + listed)


class DataError(DpokitError, ValueError):
    """A record (or file) that cannot be used, with its location: `file:line: field: problem`."""

    def __init__(self, where: str, message: str, field: str | None = None):
        self.where, self.field, self.message = where, field, message
        super().__init__(f"{where}: {field}: {message}" if field else f"{where}: {message}")


class ModelLoadError(DpokitError, RuntimeError):
    """The model named in the config cannot be found or loaded."""


class TrainingError(DpokitError, RuntimeError):
    """Training cannot go on (non-finite loss, unusable run dir, ...); the message says what to change."""


class UsageError(DpokitError, ValueError):
    """A command was given options that cannot work together or name nothing usable."""


class RewardError(DpokitError, ValueError):
    """A reward or judge that cannot be built or returned something unusable; the message names it."""


class SamplingError(DpokitError, ValueError):
    """Sampling settings or prompts that cannot be sampled."""


class Interrupted(DpokitError):
    """A run stopped by SIGINT (Ctrl-C) or SIGTERM after saving what it had; the message says how to
    resume. The command exits 128 + the signal's number (130 for Ctrl-C, 143 for SIGTERM)."""

    def __init__(self, message: str, signum: int):
        self.signum = signum
        super().__init__(message)
