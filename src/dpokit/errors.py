"""Errors that stop a run with a message saying what to change."""


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, unusable run dir, ...); the message says what to change."""


class UsageError(ValueError):
    """A command was given options that cannot work together or name nothing usable."""
