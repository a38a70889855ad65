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
import logging
import os
from pathlib import Path

import torch

from dpokit import sharding
from dpokit.errors import TrainingError
from dpokit.files import build_folder
from dpokit.modelcard import model_card
from dpokit.reference import unwrap
from dpokit.rundir import Run
from dpokit.sharding import is_sharded, load_model_state

log = logging.getLogger(__name__)


def save_checkpoint(
    model,
    tokenizer,
    folder: Path,
    step: int,
    extra: dict | None = None,
    training_state: dict | None = None,
    state_dict: dict | None = None,
    engine_state: Path | None = None,
    card: str | None = None,
) -> Path:
    """Save to `folder` (the run dir names it: Run.step_checkpoint), replacing one there, whole or not at
    all. `training_state` makes it resumable; `state_dict`: the model's whole weights when it is sharded
    (sharding.model_state); `engine_state`: a folder DeepSpeed wrote its partitions to
    (sharding.save_engine_state), moved in as `deepspeed/`; `card`: its README.md (modelcard.py), in place
    of PEFT's template.

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
        if card is not None:
            (tmp / "README.md").write_text(card)

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


# ---- a running loop's checkpoints, and where a resumed run starts


class Saver:
    """Checkpoints of a running loop: resumable step-N, the best one, the last good weights."""

    def __init__(self, run: Run, s, policy, optimizer, scheduler, guards, total_steps: int):
        """`s`: the run's session.Session (tokenizer, objective, accelerator); `guards`: its guards.Guards;
        `total_steps`: the run's schedule length (a resume with another length says what changes)."""
        self.total_steps = total_steps
        self.run, self.s, self.policy, self.optimizer, self.scheduler, self.guards = (
            run,
            s,
            policy,
            optimizer,
            scheduler,
            guards,
        )

    def save(self, step: int, name: str | None = None) -> Path | None:
        """Every process calls it: sharded weights and optimizer states are gathered to process 0, which
        writes. Step checkpoints (no `name`) are resumable and become the run's latest."""
        acc, policy = self.s.accelerator, self.policy
        weights = sharding.model_state(acc, policy, unwrap(policy).model)
        state, engine = None, None
        if name is None:
            state = {"scheduler": self.scheduler.state_dict(), "torch_rng": torch.get_rng_state()}
            if sharding.steps_in_backward(acc):  # DeepSpeed: each process writes its own ZeRO partition
                engine = sharding.save_engine_state(acc, policy, self.run.scratch(f"deepspeed-{step}"))
            else:
                state["optimizer"] = sharding.optimizer_state(policy, self.optimizer)
        if not acc.is_main_process:
            return None
        cfg = self.s.cfg
        extra = {
            "base_model": cfg.model.name,  # as the user named it: the adapter's own field holds a local path
            "total_steps": self.total_steps,
            "guards": self.guards.state_dict(),
            "objective": self.s.objective.state_dict(),
        }
        folder = self.run.checkpoint_path(name) if name else self.run.step_checkpoint(step)
        card = model_card(cfg, self.s.data.stats, self.run.figures_at(step), step, cfg.lora.enabled)
        save_checkpoint(
            unwrap(policy).model,
            self.s.tokenizer,
            folder,
            step,
            extra=extra,
            training_state=state,
            state_dict=weights,
            engine_state=engine,
            card=card,
        )
        if name is None:
            self.run.mark_latest(folder)
        return folder


def resume_point(run: Run, total_steps: int) -> dict:
    """Where a resumed run starts: its latest resumable checkpoint, and whether the run is already done."""
    folder = run.latest_checkpoint
    if folder is None:
        raise TrainingError(
            f"train.resume=true but {run.path} holds no resumable checkpoint (a step checkpoint with its "
            "training state); set train.checkpoint_every to write them, or start without train.resume"
        )
    _, info = load_training_state(folder, tensors=False)
    stopped = info.get("guards", {}).get("stop_reason")
    return {
        "folder": folder,
        "step": info["step"],
        "complete": info["step"] >= total_steps or bool(stopped),
        "stopped": stopped or "completed all steps",
        "total": total_steps,
    }


def restore(folder: Path, run: Run, s, policy, optimizer, scheduler, guards, total_steps: int):
    """Load a resumable checkpoint into a run (`s`: its session, `guards`: its Guards, `total_steps`: the
    run's steps now); returns (metrics so far, the initial eval)."""
    state, info = load_training_state(folder)
    if sharding.steps_in_backward(s.accelerator):  # DeepSpeed restores the weights and its partitions itself
        sharding.load_engine_state(policy, folder / sharding.ENGINE_STATE)
    else:
        load_model_weights(unwrap(policy).model, folder, lora=s.cfg.lora.enabled)
        sharding.load_optimizer_state(policy, optimizer, state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    follow_new_schedule(scheduler, optimizer, info.get("total_steps"), total_steps, info["step"])
    torch.set_rng_state(state["torch_rng"])
    guards.load_state_dict(info["guards"])
    s.objective.load_state_dict(info["objective"])
    if s.accelerator.is_main_process:
        run.forget_after(info["step"])
    records = run.metrics
    initial = next((r for r in records if r["step"] == 0), None)
    log.info("resumed from %s (step %d)", folder, info["step"])
    return [r for r in records if 0 < r["step"] <= info["step"]], (
        {k: v for k, v in initial.items() if k.startswith("eval/")} if initial else None
    )


def follow_new_schedule(scheduler, optimizer, saved_total: int | None, total: int, step: int) -> None:
    """A resumed run with another number of steps (train.max_steps or epochs changed, e.g. to extend a
    finished run): the learning rate follows the new schedule from this step on, and the log says so. The
    restored scheduler state holds the old schedule's last rate (0 at the end of a linear decay)."""
    if saved_total is None or saved_total == total:
        return
    before = scheduler.get_last_lr()[0]
    rates = [
        base * factor(scheduler.last_epoch)
        for base, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)
    ]
    for group, lr in zip(optimizer.param_groups, rates, strict=True):
        group["lr"] = lr
    scheduler._last_lr = rates
    log.warning(
        "the run had %d steps and now has %d: from step %d on, the learning rate follows the new schedule "
        "(warm-up and decay over %d steps): %.3g, where the old one was at %.3g",
        saved_total,
        total,
        step + 1,
        total,
        rates[0],
        before,
    )
