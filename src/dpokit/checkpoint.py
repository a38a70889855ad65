"""Checkpoints in Hugging Face format, written atomically (temp folder + rename: whole or absent)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path


def save_checkpoint(model, tokenizer, run_dir: Path, step: int, extra: dict | None = None, name: str | None = None) -> Path:
    """Save `model` (a PEFT adapter or a full model) + tokenizer to RUN_DIR/checkpoints/step-N (or `name`).

    The folder loads back with `AutoModelForCausalLM.from_pretrained` (full) or
    `PeftModel.from_pretrained(base, folder)` / `AutoPeftModelForCausalLM` (adapter).
    """
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    target = root / (name or f"step-{step}")
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=root))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "dpokit_state.json").write_text(json.dumps({"step": step, **(extra or {})}, indent=2))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if name is None:
        (root / "latest").write_text(target.name + "\n")
    return target
