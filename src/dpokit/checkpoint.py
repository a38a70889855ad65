"""Checkpoints in Hugging Face format, written atomically (temp folder + rename: whole or absent).

A checkpoint folder (the run dir names and lists them: rundir.Run) holds the model (a PEFT adapter or a
full model, safetensors) and the tokenizer, so it loads with `from_pretrained`; plus, for exact resume, `training_state.pt` (optimizer, scheduler and
RNG states; only tensors and plain containers, read back with `torch.load(weights_only=True)`) and
`dpokit_state.json` (the step, guard and loss state). Nothing user-supplied is unpickled. Under DeepSpeed
the optimizer state is DeepSpeed's own checkpoint of its ZeRO partitions, in `deepspeed/`, which DeepSpeed
reads back with pickle on resume (its files hold objects of its own).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from dpokit.files import build_folder
from dpokit.sharding import is_sharded, load_model_state


def save_checkpoint(
    model,
    tokenizer,
    folder: Path,
    step: int,
    extra: dict | None = None,
    training_state: dict | None = None,
    state_dict: dict | None = None,
    engine_state: Path | None = None,
) -> Path:
    """Save to `folder` (the run dir names it: Run.step_checkpoint), replacing one there, whole or not at
    all. `training_state` makes it resumable; `state_dict`: the model's whole weights when it is sharded
    (sharding.model_state); `engine_state`: a folder DeepSpeed wrote its partitions to
    (sharding.save_engine_state), moved in as `deepspeed/`.

    The folder loads back with `AutoModelForCausalLM.from_pretrained` (full) or
    `PeftModel.from_pretrained(base, folder)` / `AutoPeftModelForCausalLM` (adapter).
    """

    def build(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)
        if training_state is not None:
            torch.save(training_state, tmp / "training_state.pt")
        if engine_state is not None:
            os.replace(engine_state, tmp / "deepspeed")
        (tmp / "dpokit_state.json").write_text(json.dumps({"step": step, **(extra or {})}, indent=2))

    build_folder(Path(folder), build, "dpokit_state.json", replace=True)
    return Path(folder)


def load_training_state(folder: Path, tensors: bool = True) -> tuple[dict | None, dict]:
    """(training_state, dpokit_state) of a checkpoint; tensors only, no pickled objects. `tensors=False`:
    the dpokit state alone (None for the tensors)."""
    info = json.loads((folder / "dpokit_state.json").read_text())
    if not tensors:
        return None, info
    return torch.load(folder / "training_state.pt", map_location="cpu", weights_only=True), info


def load_model_weights(model, folder: Path, lora: bool) -> None:
    """Copy a checkpoint's weights into an already built policy (LoRA adapter or full model)."""
    from safetensors.torch import load_file

    if lora:
        adapter = load_file(str(folder / "adapter_model.safetensors"))
        if is_sharded(model):  # the file names LoRA weights without the adapter's name; the model with it
            named = {
                k.replace(f".{model.active_adapter}.", "."): k for k in model.state_dict() if "lora_" in k
            }
            load_model_state(model, {named[k]: v for k, v in adapter.items()})
            return
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, adapter)
        return
    state = {}
    for shard in sorted(folder.glob("*.safetensors")):
        state.update(load_file(str(shard)))
    if is_sharded(model):
        load_model_state(model, state)
        return
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    if [k for k in missing if k not in tied] or unexpected:
        raise RuntimeError(
            f"checkpoint {folder} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
