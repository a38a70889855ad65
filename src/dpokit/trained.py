"""Loading what was trained: the one function (`load_trained`, the public `dpokit.load`) that turns a run, a
checkpoint or a model into a policy ready to sample from or score, with its reference on request.
Evaluation, the rounds, export, the demo and the API all load through it.

What each target means:
- a run dir (or `Run`): its final checkpoint (or `checkpoint=`: best, latest, a step), on the base its config
  names (model.name, with model.adapter merged in for adapter_mode=merge); an iterate run: its last round;
- a checkpoint folder of a run (RUN/<checkpoints>/step-N): that checkpoint, with its run's config;
- a LoRA adapter folder outside a run: on the base its adapter_config.json names;
- a model (folder, .gguf, alias, hub id): that model.

`reference=True` gives the policy's own reference, the one its training measured rewards against: the
policy with its adapters off (LoRA), the run's model.reference or starting adapter when it had one, else
the starting model (full fine-tuning). `reference="base"`: a LoRA policy's base (adapters off), whatever
its run measured against; `reference="MODEL"` names another. Imports nothing of training.
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from dpokit import models
from dpokit.config import Config, LossConfig, TrainConfig
from dpokit.errors import UsageError
from dpokit.rundir import Run

log = logging.getLogger(__name__)


@dataclass
class Trained:
    """A trained policy, loaded: `model` (a causal LM, PEFT-wrapped for a LoRA run, eval mode, frozen) and
    its `tokenizer`, ready for `generate`; `reference` (a reference.Reference) when asked for."""

    model: object
    tokenizer: object
    reference: object | None = None
    config: Config | None = None
    """The run's config (None for a model or adapter outside a run)."""
    checkpoint: Path | None = None
    source: str = ""
    """What was loaded, for messages and eval.json."""
    loss: LossConfig = field(default_factory=LossConfig)
    """The loss the policy was trained with (its beta scales the implicit reward)."""
    bf16: bool = False
    """bf16 autocast for its forward passes (as trained)."""
    layout: object = None
    """The batch layout scoring uses (batching.Layout; every layout gives the same numbers)."""
    start_config: Config | None = None
    """The config that names where the policy's training started (an iterate run's own for its rounds)."""
    interpolation: object = field(default=None, repr=False)
    """interpolation.Interpolation, once `interpolate` was called."""

    @property
    def is_lora(self) -> bool:
        return hasattr(self.model, "disable_adapter")

    def generate(
        self,
        prompts,
        n: int = 1,
        max_new_tokens: int = 64,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int = 0,
    ):
        """Completions of a prompt (text, or chat messages rendered with the chat template) or of a list of
        prompts: a str per prompt for n=1, else a list of n. Sampled as `dpokit iterate` samples (seeded,
        temperature 0 = greedy)."""
        from dpokit.generate import SamplingSettings, sample

        single = isinstance(prompts, str) or (
            isinstance(prompts, list) and bool(prompts) and isinstance(prompts[0], dict)
        )
        batch = [prompts] if single else list(prompts)
        settings = SamplingSettings(
            max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed, bf16=self.bf16
        )
        drawn = sample(self.model, self.tokenizer, batch, n, settings, progress=False)
        texts = [[s.completion for s in row] if n > 1 else row[0].completion for row in drawn]
        return texts[0] if single else texts

    @property
    def lam(self) -> float:
        """Where the policy is between its start (0) and as trained (1): see `interpolate`."""
        return self.interpolation.lam if self.interpolation is not None else 1.0

    def interpolate(self, lam: float) -> Trained:
        """Set the policy, in place, to theta0 + lam (theta - theta0) between the model its training started
        from (lam = 0) and as trained (lam = 1), WARP's LITI (interpolation.py); any later lam restarts from
        the trained weights. LoRA: the adapter scaled by lam; full fine-tuning: the starting model is loaded
        once and each weight interpolated. Returns self."""
        if self.interpolation is None:
            self.interpolation = _toward_start(self)
        self.interpolation.set(lam)
        return self

    def merged(self):
        """The policy as one plain causal LM: a LoRA adapter merged into its base (PEFT's merge)."""
        if not self.is_lora:
            return self.model
        return self.model.merge_and_unload()


def load_trained(
    target,
    *,
    checkpoint: str | int | None = None,
    reference: bool | str = False,
    device: str | None = None,
    bf16: bool | None = None,
) -> Trained:
    """The policy of `target` (see the module docstring), on `device` (default: cuda when present, else
    cpu); `bf16` overrides the run's train.bf16 for its forward passes."""
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    run, folder = _locate(target, checkpoint)
    if run is None:
        trained = _load_outside_run(str(target), folder)
    else:
        trained = _load_from_run(run, folder)
    if bf16 is not None:
        trained.bf16 = bf16
    origin = target if isinstance(target, Run) else Run(target)
    trained.start_config = origin.config if origin.exists and origin.is_iterate else trained.config
    trained.model = trained.model.to(device).eval().requires_grad_(False)
    if reference is True and origin.exists and origin.is_iterate:
        # an iterate run is measured as its rounds are: against the initial model, also where each round
        # trained against the previous one (iterate.reference=previous)
        start = origin.config
        reference = "base" if start.lora.enabled else start.model.name
    if reference:
        trained.reference = _reference(trained, reference, device)
    from dpokit.batching import layout_for

    cfg = trained.config
    extra = [m for m in [_network(trained.reference)] if m is not None]
    trained.layout = layout_for(
        cfg.train if cfg else TrainConfig(),
        [trained.model, *extra],
        cfg.data.max_length if cfg else None,
        share_completions=not cfg or cfg.loss.ld_alpha == 1.0,
    )
    return trained


def load_start(cfg: Config, device: str | None = None) -> Trained:
    """The policy a config starts from (model.name, with model.adapter), frozen: what its training begins
    with, and what the rounds' first samples come from."""
    import torch

    m = cfg.model
    model = models.load_run_base(cfg)
    if m.adapter and m.adapter_mode == "continue":
        model = models.load_adapter(model, models.resolve_adapter(m.adapter), trainable=False)
    tokenizer = models.load_tokenizer(models.resolve_model_path(m.name), m.trust_remote_code)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device).eval().requires_grad_(False)
    return Trained(model, tokenizer, None, cfg, None, m.name, cfg.loss, cfg.train.bf16)


def _locate(target, checkpoint) -> tuple[Run | None, Path | None]:
    """(the run, the checkpoint folder) of a target; (None, folder) for a model or adapter folder outside a
    run; (None, None) for a model that is not a folder (an alias, a hub id, a .gguf file)."""
    run = target if isinstance(target, Run) else Run(target)
    if run.exists:
        if run.is_iterate:
            done = [r for r in run.rounds if r.done]
            if not done:
                raise UsageError(
                    f"{run.path}: an iterate run with no finished round yet: nothing trained to load"
                )
            return _locate(done[-1].train, done[-1].policy_checkpoint if checkpoint is None else checkpoint)
        folder = run.checkpoint(checkpoint)
        if checkpoint is None and not (run.summary or {}).get("checkpoint"):
            log.warning(
                "%s: the run has no final checkpoint (it did not finish): using its newest one, %s",
                run.path,
                folder.name,
            )
        return run, folder
    path = Path(target)
    if checkpoint is not None:
        raise UsageError(
            f"{target}: not a run dir (no {Run.CONFIG}); checkpoint={checkpoint!r} names a run's checkpoint"
        )
    if path.is_dir():
        return Run.of_checkpoint(path), path
    return None, None


def _load_from_run(run: Run, ckpt: Path) -> Trained:
    cfg = run.config
    tokenizer = models.load_tokenizer(str(ckpt), cfg.model.trust_remote_code)
    m = cfg.model
    if run.kind == "rm":  # a reward model: the transformer with its score head
        path = str(ckpt) if not cfg.lora.enabled else models.resolve_model_path(m.name)
        base = models.load_reward_model(path, tokenizer.pad_token_id, cfg.train.seed, m.trust_remote_code)
        policy = _with_adapter(base, ckpt) if cfg.lora.enabled else base
    elif cfg.lora.enabled:
        policy = _with_adapter(models.load_run_base(cfg), ckpt)
    else:
        policy = models.load_model(str(ckpt), cfg.model.trust_remote_code, cfg.model.attn_implementation)
    return Trained(policy, tokenizer, None, cfg, ckpt, f"{run.path} ({ckpt.name})", cfg.loss, cfg.train.bf16)


def _load_outside_run(target: str, folder: Path | None) -> Trained:
    if folder is not None and (folder / "adapter_config.json").is_file():
        base = json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path") or ""
        if not base:
            raise UsageError(
                f"{folder}: a LoRA adapter whose base model is unknown (no run config beside it)"
            )
        base_model = models.load_model(models.resolve_model_path(base, "the adapter's base model"))
        return Trained(
            _with_adapter(base_model, folder), models.load_tokenizer(str(folder)), None, None, folder, target
        )
    resolved = models.resolve_model_path(target, "model")
    return Trained(models.load_model(resolved), models.load_tokenizer(resolved), None, None, folder, target)


def _with_adapter(base, ckpt: Path):
    from peft import PeftModel

    with warnings.catch_warnings():  # peft calls a deprecated transformers name; nothing to act on
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return PeftModel.from_pretrained(base, str(ckpt))


def _reference(trained: Trained, reference: bool | str, device: str):
    """The Reference of a loaded policy (see the module docstring)."""
    from dpokit.reference import Reference

    cfg = trained.config
    chunk, bf16 = (cfg.train.logps_chunk_size, trained.bf16) if cfg else (1024, trained.bf16)
    if reference == "base" or (reference is True and cfg is not None and trained.is_lora):
        ref_model = (
            None
            if reference == "base"
            else models.load_reference_model(cfg, models.resolve_model_path(cfg.model.name))
        )
        if ref_model is None:
            if not trained.is_lora:
                raise UsageError(
                    f"reference='base' is a LoRA policy's base; {trained.source!r} is a full model"
                )
            from dpokit.logps import CompletionLogps

            return Reference.adapters_off(CompletionLogps(trained.model, chunk, bf16))
    elif isinstance(reference, str):
        ref_model = models.load_model(models.resolve_model_path(reference, "reference"))
    elif cfg is None:
        raise UsageError(
            f"{trained.source!r} is a model, not a run: its reference is unknown; name the model it was trained "
            "from (reference=MODEL, or --ref MODEL)"
        )
    else:
        ref_model = models.load_reference_model(cfg, models.resolve_model_path(cfg.model.name))
        if ref_model is None:
            ref_model = models.load_model(
                models.resolve_model_path(cfg.model.name),
                cfg.model.trust_remote_code,
                cfg.model.attn_implementation,
            )
    return Reference.separate(ref_model.to(device), chunk, bf16)


def _toward_start(trained: Trained):
    """The Interpolation of a loaded policy toward the model its training started from."""
    from dpokit.interpolation import Interpolation

    cfg = trained.start_config
    base = trained.model.get_base_model() if trained.is_lora else trained.model
    if type(base).__name__.endswith("ForSequenceClassification"):
        raise UsageError(f"{trained.source}: a reward model; interpolation is for policies")
    if trained.is_lora:
        if cfg is not None and cfg.model.adapter and cfg.model.adapter_mode == "continue":
            raise UsageError(
                f"{trained.source}: its training continued the adapter {cfg.model.adapter!r}, so scaling the "
                "adapter would interpolate toward the base, not toward where it started. Interpolate the iterate "
                "run dir (its rounds start from its model), or train with model.adapter_mode=merge"
            )
        return Interpolation(trained.model, None)
    if cfg is None:
        raise UsageError(
            f"{trained.source}: a fully fine-tuned model outside a run: the model it started from is unknown, "
            "so there is nothing to interpolate toward; give its run dir"
        )
    device = next(trained.model.parameters()).device
    start = load_start(cfg, device=str(device)).merged()
    return Interpolation(trained.model, dict(start.named_parameters()))


def _network(reference):
    """The model a Reference runs, when it is a separate one (layout_for switches its attention too)."""
    if reference is None or reference.disable_adapters or reference.network is None:
        return None
    from dpokit.reference import unwrap

    return unwrap(reference.network).model
