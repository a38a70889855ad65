"""The run directory: checked before anything is loaded, created only once data and model are ready (a failed
start leaves nothing behind), written by rank 0 only."""

from __future__ import annotations

import dataclasses
import json
import os
import resource
from datetime import datetime
from pathlib import Path

import torch

from dpokit.config import Config, dump_yaml
from dpokit.errors import TrainingError


def is_main_process() -> bool:
    """Rank 0 (or no launcher): the only process that writes the run dir."""
    return int(os.environ.get("RANK", "0")) == 0


def with_run_dir(cfg: Config) -> Config:
    """The config with train.run_dir filled in (empty = runs/<timestamp>); the given config is not changed."""
    if cfg.train.run_dir:
        return cfg
    stamp = str(Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S"))
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, run_dir=stamp))


def check_run_dir(cfg: Config) -> Path:
    """Refuse an unusable run dir before anything is loaded or written: nothing to resume, a finished run
    in the way, no room for a checkpoint."""
    run_dir = Path(cfg.train.run_dir)
    if cfg.train.resume:
        if not run_dir.is_dir():
            raise TrainingError(f"train.resume=true: {str(run_dir)!r}: no such folder; check train.run_dir")
        if not (run_dir / "config.yaml").is_file():
            raise TrainingError(
                f"train.resume=true: {str(run_dir)!r} holds no run (config.yaml); check train.run_dir"
            )
    elif (run_dir / "metrics.jsonl").exists() and not cfg.train.overwrite:
        raise TrainingError(
            f"train.run_dir={str(run_dir)!r} already holds a run (metrics.jsonl). "
            "Fix: choose another run_dir or set train.overwrite=true."
        )
    existing = _nearest_existing(run_dir)
    if not existing.is_dir():
        raise TrainingError(f"train.run_dir={str(run_dir)!r} is not writable: {existing} is a file")
    return run_dir


def _nearest_existing(path: Path) -> Path:
    return next((p for p in [path, *path.parents] if p.exists()), Path("."))


def create_run_dir(cfg: Config, data_stats: dict) -> Path:
    """Write config.yaml and data_stats.json (rank 0; a resumed run keeps its own)."""
    run_dir = Path(cfg.train.run_dir)
    if cfg.train.resume or not is_main_process():
        return run_dir
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        for stale in (
            "metrics.jsonl",
            "pair_samples.jsonl",
            "eval.json",
            "eval_samples.jsonl",
            "report.html",
            "summary.json",
        ):
            (run_dir / stale).unlink(missing_ok=True)
        (run_dir / "config.yaml").write_text(dump_yaml(cfg))
        (run_dir / "data_stats.json").write_text(json.dumps(data_stats, indent=2))
    except OSError as err:
        raise TrainingError(f"train.run_dir={str(run_dir)!r} is not writable: {err}") from err
    return run_dir


def check_disk_space(cfg: Config, model) -> None:
    """Refuse to start when the run dir's disk cannot hold even one checkpoint (a rough lower bound: the
    weights for full fine-tuning, and optimizer states twice that; 64 MiB for an adapter)."""
    import shutil

    free = shutil.disk_usage(_nearest_existing(Path(cfg.train.run_dir))).free
    needed = 64 * 2**20
    if not cfg.lora.enabled and (cfg.train.checkpoint_every or cfg.train.save_final):
        needed += 3 * sum(p.numel() * p.element_size() for p in model.parameters())
    if free < needed:
        raise TrainingError(
            f"train.run_dir={cfg.train.run_dir!r}: {free / 2**20:.0f} MiB free on its disk, a checkpoint needs about "
            f"{needed / 2**20:.0f} MiB. Fix: free space or choose a run_dir on another disk."
        )


def write_summary(
    run_dir: Path,
    history,
    initial_eval,
    final_eval,
    ckpt,
    wall_s: float,
    stopped: str,
    guards=None,
    reference: dict | None = None,
) -> None:
    summary = {
        "steps": len(history),
        "stopped": stopped,
        "warnings": guards.warnings if guards else [],
        "best_eval_margin": guards.best if guards else None,
        "best_eval_step": guards.best_step if guards else None,
        "final_train": history[-1] if history else None,
        "initial_eval": initial_eval,
        "final_eval": final_eval,
        "checkpoint": str(ckpt) if ckpt else None,
        "reference": reference,
        "wall_s": wall_s,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    if torch.cuda.is_initialized():  # the memory that limits a GPU run: this process's peak on its device
        summary["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
