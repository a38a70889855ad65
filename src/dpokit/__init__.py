"""dpokit: Direct Preference Optimization and its family of preference losses for causal language models.

    import dpokit
    run = dpokit.train("configs/tiny.yaml", data=[{"prompt": ..., "chosen": ..., "rejected": ...}, ...])
    run.metrics[-1]["rewards/margins"]
    policy = run.load()
    policy.generate("Write a short review of a film you liked.")

See docs/python.md. Importing dpokit loads no model code (torch is imported when a function needs it).
"""

from importlib import metadata as _metadata

from dpokit import labels
from dpokit.api import (
    EvalSettings,
    Evaluation,
    check,
    config,
    evaluate,
    export,
    filter,
    iterate,
    load,
    precompute_ref,
    split,
    train,
    train_rm,
)
from dpokit.config import Config
from dpokit.errors import (
    ConfigError,
    DataError,
    DpokitError,
    Interrupted,
    ModelLoadError,
    RewardError,
    SamplingError,
    TrainingError,
    UsageError,
)
from dpokit.rundir import Round, Run

try:
    __version__ = _metadata.version("dpokit")
except _metadata.PackageNotFoundError:  # a source tree on sys.path, not installed
    __version__ = "unknown"

__all__ = [
    "Config",
    "ConfigError",
    "DataError",
    "DpokitError",
    "EvalSettings",
    "Evaluation",
    "Interrupted",
    "ModelLoadError",
    "RewardError",
    "Round",
    "Run",
    "SamplingError",
    "TrainingError",
    "UsageError",
    "__version__",
    "check",
    "config",
    "evaluate",
    "export",
    "filter",
    "iterate",
    "labels",
    "load",
    "precompute_ref",
    "split",
    "train",
    "train_rm",
]
