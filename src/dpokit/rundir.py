"""The run directory: created (or checked for a resume) before any model is loaded, written by rank 0 only."""

from __future__ import annotations

import json
import os
import resource
from datetime import datetime
from pathlib import Path

from dpokit import models
from dpokit.config import Config, dump_yaml
from dpokit.errors import TrainingError


def is_main_process() -> bool:
    """Rank 0 (or no launcher): the only process that writes the run dir."""
    return int(os.environ.get("RANK", "0")) == 0


def prepare_run_dir(cfg: Config) -> Path:
    if cfg.train.resume:
        run_dir = Path(cfg.train.run_dir)
        if not (run_dir / "config.yaml").is_file():
            raise TrainingError(f"train.resume=true: {str(run_dir)!r} holds no run (config.yaml); check train.run_dir")
        check_disk_space(run_dir, cfg)
        return run_dir
    if not cfg.train.run_dir:
        cfg.train.run_dir = str(Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S"))
    run_dir = Path(cfg.train.run_dir)
    if not is_main_process():
        return run_dir
    if (run_dir / "metrics.jsonl").exists() and not cfg.train.overwrite:
        raise TrainingError(
            f"train.run_dir={str(run_dir)!r} already holds a run (metrics.jsonl). "
            "Fix: choose another run_dir or set train.overwrite=true."
        )
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        for stale in ("metrics.jsonl", "pair_samples.jsonl", "eval.json", "eval_samples.jsonl", "report.html"):
            (run_dir / stale).unlink(missing_ok=True)
        (run_dir / "config.yaml").write_text(dump_yaml(cfg))
    except OSError as err:
        raise TrainingError(f"train.run_dir={str(run_dir)!r} is not writable: {err}") from err
    check_disk_space(run_dir, cfg)
    return run_dir


def check_disk_space(run_dir: Path, cfg: Config) -> None:
    """Refuse to start when the run dir's disk cannot hold even one checkpoint (a rough lower bound:
    the weights file for full fine-tuning, and optimizer states twice that)."""
    import shutil

    free = shutil.disk_usage(run_dir).free
    needed = 64 * 2**20
    if not cfg.lora.enabled and (cfg.train.checkpoint_every or cfg.train.save_final):
        model_dir = Path(models.resolve_model_path(cfg.model.name))
        weights = sum(f.stat().st_size for f in model_dir.glob("*.safetensors")) if model_dir.is_dir() else 0
        needed += 3 * weights
    if free < needed:
        raise TrainingError(
            f"train.run_dir={str(run_dir)!r}: {free / 2**20:.0f} MiB free on its disk, a checkpoint needs about "
            f"{needed / 2**20:.0f} MiB. Fix: free space or choose a run_dir on another disk."
        )


def write_summary(run_dir: Path, history, initial_eval, final_eval, ckpt, wall_s: float, stopped: str, guards=None) -> None:
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
        "wall_s": wall_s,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
