"""Everything a run needs, built once from the config and checked before anything is written: devices,
tokenizer, data, model (+ LoRA) and the objective. A model, data or setting problem stops here with one
clear error, so a failed start leaves no run directory behind."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from dpokit import batching as layouts
from dpokit import models
from dpokit.attention import enable_blocks
from dpokit.backends import apply_matmul_backend, use_low_memory_allocator
from dpokit.batching import Batch, Layout, UnpairedBatch
from dpokit.config import Config
from dpokit.data.prepare import PreparedData, prepare_data, read_splits
from dpokit.errors import UsageError
from dpokit.logps import CompletionLogps, RewardScores
from dpokit.objective import Objective
from dpokit.schedule import prompt_groups

log = logging.getLogger(__name__)
GRID_WARN_SHARE = 0.05
"""Warn about bf16 full fine-tuning when more than this share of the weights sit on the bf16 grid."""


@dataclass
class Session:
    cfg: Config
    accelerator: object
    tokenizer: object
    objective: Objective
    policy: torch.nn.Module
    """CompletionLogps around the model (PEFT-wrapped for LoRA), before Accelerate's prepare."""
    data: PreparedData
    layout: Layout
    warnings: list[str] = field(default_factory=list)
    """Said once at setup; the run keeps them in its summary."""
    reference_model: torch.nn.Module | None = None
    """pi_ref when it is neither the policy with adapters off nor a copy of its start
    (models.load_reference_model)."""

    def reload_start(self) -> torch.nn.Module:
        """The starting model of full fine-tuning, loaded again and set up as at setup (its attention)."""
        m = self.cfg.model
        model = models.load_model(
            models.resolve_model_path(m.name), m.trust_remote_code, m.attn_implementation
        )
        if self.layout.attention == "blocks":
            enable_blocks(model, self.cfg.data.max_length)
        return model

    def train_groups(self) -> list[list[int]] | None:
        """Pairs that step_schedule keeps together (train.group_by_prompt): those of one prompt. Never for
        unpaired examples: KTO's KL baseline pairs each prompt with another example's completion."""
        if not self.cfg.train.group_by_prompt or self.objective.unpaired:
            return None
        return prompt_groups(self.data.train)

    def batch(self, examples: list, indices: list[int]) -> Batch | UnpairedBatch:
        """The micro-batch of `examples[i] for i in indices`, laid out and on the device."""
        chosen = [examples[i] for i in indices]
        pad = self.tokenizer.pad_token_id
        if self.objective.unpaired:
            built = self.layout.unpaired(chosen, pad, self.cfg.data.max_length, ids=indices)
        else:
            built = self.layout.pairs(chosen, pad, ids=indices)
        return built.to(self.accelerator.device)


def setup(
    cfg: Config, run_dir_hint: str | None = None, trackers: list | None = None, given: dict | None = None
) -> Session:
    """Build the session. `run_dir_hint`: the Accelerate project dir (trackers write there later); `given`:
    records in memory by split (read_splits)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    apply_matmul_backend(cfg.train.fast_fp32_matmul)
    if cfg.train.low_memory_allocator:
        use_low_memory_allocator()
    # bf16 is autocast inside CompletionLogps (fp32 master weights), not through Accelerate's process-wide
    # mixed-precision state, which cannot change between two runs in one Python process.
    sinks = [*cfg.train.report_to, *(trackers or [])]
    check_deepspeed(cfg.train.device)
    accelerator = Accelerator(cpu=on_cpu(cfg.train.device), log_with=sinks or None, project_dir=run_dir_hint)
    check_distributed(accelerator)
    objective = Objective(cfg.loss, _mean_reduce(accelerator))
    # bad data stops the run before a model is converted or loaded
    splits = read_splits(cfg, objective.unpaired, given)
    model_path = models.resolve_model_path(cfg.model.name)
    if cfg.model.adapter:
        models.resolve_adapter(cfg.model.adapter)
    tokenizer = models.load_tokenizer(model_path, cfg.model.trust_remote_code, cfg.data.chat_template)
    data = prepare_data(cfg, tokenizer, objective.unpaired, splits, models.cache_dir() / "tokenized")
    if objective.reward_model:  # a score head on the same transformer (dpokit train-rm)
        m = cfg.model
        model = models.load_reward_model(
            model_path, tokenizer.pad_token_id, cfg.train.seed, m.trust_remote_code, m.attn_implementation
        )
    else:
        model = models.load_model(model_path, cfg.model.trust_remote_code, cfg.model.attn_implementation)
    context = models.context_length(model)
    if context and cfg.data.max_length > context:
        raise models.ModelLoadError(
            f"data.max_length={cfg.data.max_length} is longer than the model's context ({context} positions, "
            f"max_position_embeddings of {cfg.model.name}); set data.max_length <= {context}"
        )
    reference_model = models.load_reference_model(cfg, model_path) if objective.needs_reference else None
    if reference_model is not None and cfg.model.reference:
        same_vocab(tokenizer, cfg.model.reference, cfg.model.trust_remote_code)
    if cfg.train.gradient_checkpointing:
        models.enable_activation_checkpointing(model)
    grid = bf16_grid_warning(model) if cfg.train.bf16 and not cfg.lora.enabled else None
    layout = layout_for(cfg, model, *([reference_model] if reference_model is not None else []))
    # The run's random draws start here, whatever ran before (a model conversion, another run in this
    # process): LoRA's initial A matrices, then dropout.
    set_seed(cfg.train.seed)
    if cfg.lora.enabled:
        lc = cfg.lora
        if cfg.model.adapter and cfg.model.adapter_mode == "merge":
            merged = models.load_adapter(model, cfg.model.adapter, trainable=False).merge_and_unload()
            model = models.add_lora(merged, lc.r, lc.alpha, lc.dropout, lc.target_modules)
        elif cfg.model.adapter:
            model = models.load_adapter(model, cfg.model.adapter, trainable=True)
        else:
            task = "SEQ_CLS" if objective.reward_model else "CAUSAL_LM"
            model = models.add_lora(model, lc.r, lc.alpha, lc.dropout, lc.target_modules, task)
    wrap = RewardScores if objective.reward_model else CompletionLogps
    policy = wrap(model, cfg.train.logps_chunk_size, bf16=cfg.train.bf16)
    if grid:
        log.warning(grid)
    return Session(
        cfg, accelerator, tokenizer, objective, policy, data, layout, [grid] if grid else [], reference_model
    )


def same_vocab(tokenizer, reference: str, trust_remote_code: bool) -> None:
    """A separate reference must read the same token ids as the policy."""
    ref_tokenizer = models.load_tokenizer(
        models.resolve_model_path(reference, "model.reference"), trust_remote_code
    )
    if ref_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise models.ModelLoadError(
            f"model.reference={reference!r} has another vocabulary than model.name ({len(ref_tokenizer)} vs "
            f"{len(tokenizer)} tokens): the reference must score the policy's token ids; use a checkpoint of "
            "the same model family"
        )


def on_cpu(device: str) -> bool:
    """Accelerate's cpu flag: train.device=cpu, or auto in a multi-process launch without CUDA. Without the
    flag Accelerate leaves CPU processes unjoined (distributed type NO): each would train alone. Never under
    DeepSpeed, which the flag turns off: DeepSpeed picks its accelerator itself (CUDA, else the CPU)."""
    import os

    if _asked("DEEPSPEED"):
        return False
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return device == "cpu" or (device == "auto" and launched and not torch.cuda.is_available())


def _asked(engine: str) -> bool:
    """Whether the launch asks Accelerate for `engine` (FSDP, DEEPSPEED): `accelerate launch` with such a
    config sets this variable."""
    import os

    return os.environ.get(f"ACCELERATE_USE_{engine}", "").lower() == "true"


def check_deepspeed(device: str) -> None:
    """Before Accelerate, which stops with an ImportError traceback when the package is missing."""
    import importlib.util

    if not _asked("DEEPSPEED"):
        return
    if importlib.util.find_spec("deepspeed") is None:
        raise UsageError(
            "the launch asks for DeepSpeed (ACCELERATE_USE_DEEPSPEED=true) but the deepspeed package is not "
            "installed: pip install deepspeed (make deepspeed)"
        )
    if device == "cpu" and torch.cuda.is_available():
        raise UsageError(
            "train.device=cpu under DeepSpeed on a machine with CUDA: DeepSpeed runs on the GPUs; use "
            "train.device=auto, or launch without DeepSpeed (--num-processes N) to train on the CPU"
        )


def fit_deepspeed(accelerator, micro_pairs: int, max_grad_norm: float | None) -> None:
    """Fill the DeepSpeed config from the run before Accelerate hands it to DeepSpeed: dpokit forms the batches
    and accumulates over micro-batches itself (it marks each step's last one through
    Accelerator.sync_gradients), so DeepSpeed sees micro-batches of `micro_pairs` pairs and no accumulation of
    its own; it clips at train.max_grad_norm; ZeRO-3 gathers whole weights for checkpoints."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        return
    config = plugin.deepspeed_config
    config["train_micro_batch_size_per_gpu"] = micro_pairs
    config["gradient_accumulation_steps"] = 1
    config["train_batch_size"] = micro_pairs * accelerator.num_processes
    config["gradient_clipping"] = float(max_grad_norm or 0.0)
    if plugin.zero_stage == 3:
        config.setdefault("zero_optimization", {})["stage3_gather_16bit_weights_on_model_save"] = True


def check_distributed(accelerator) -> None:
    """Stop a launch that would not do what it asked for, before anything is written: an engine (FSDP,
    DeepSpeed) that Accelerate did not turn on, or processes that Accelerate did not join or count (each
    would train alone and write the same run dir)."""
    import os

    import accelerate
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if _asked("DEEPSPEED") and kind != DistributedType.DEEPSPEED:
        raise UsageError(
            f"DeepSpeed was asked for but Accelerate {accelerate.__version__} runs {kind.value} here"
        )
    if _asked("FSDP") and kind != DistributedType.FSDP:
        raise UsageError(
            f"FSDP was asked for (ACCELERATE_USE_FSDP=true) but Accelerate {accelerate.__version__} runs "
            f"{kind.value} here: it turns FSDP on for accelerators only (GPU, XPU, NPU, ...), not on a CPU. On CPU "
            "use data parallel: --num-processes N"
        )
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and accelerator.num_processes == 1 and kind == DistributedType.DEEPSPEED:
        raise UsageError(
            f"{world} processes were launched under DeepSpeed, but without CUDA Accelerate {accelerate.__version__} "
            "counts one process in each (every one would train on all the data and write the same run dir). On "
            "CPU use data parallel: --num-processes N"
        )
    if world > 1 and accelerator.num_processes == 1:
        raise UsageError(
            f"{world} processes were launched but Accelerate joined none of them (distributed type "
            f"{kind.value}): each would train alone into the same run dir. Launch with `dpokit train "
            "--num-processes N` or `accelerate launch` with a config (configs/accelerate/)"
        )


def layout_for(cfg: Config, model, *more) -> Layout:
    """The run's layout for these models (batching.layout_for with the run's settings)."""
    return layouts.layout_for(cfg.train, (model, *more), cfg.data.max_length, cfg.loss.ld_alpha == 1.0)


def bf16_grid_warning(model) -> str | None:
    """bf16 autocast sees a weight only as its bf16 rounding. Weights exactly on a bf16 value keep it until
    updates add up to half a bf16 step; weights halfway between two (ties) flip a whole step at any update.
    Dequantized and bf16-published checkpoints are full of both; random fp32 weights have almost none."""
    exact, ties = models.bf16_grid_shares(model.parameters())
    if exact + ties <= GRID_WARN_SHARE:
        return None
    return (
        f"train.bf16=true with full fine-tuning: {exact:.1%} of the weights are exactly bf16 values and "
        f"{ties:.1%} sit halfway between two (random fp32 weights: about 0.002% each). The bf16 forward sees an "
        "update only when it crosses a rounding boundary: small updates are lost on exact values and blown up "
        "to a whole bf16 step on halfway ones. Measured on SmolLM2-135M, 4 HH pairs, lr 1e-6: the margin after "
        "one update is 0.28x fp32's (18x before dpokit dithered the halfway weights at conversion; "
        "benchmarks/bf16_ties.py). Fix: train.bf16=false for full fine-tuning, or LoRA (lora.enabled=true)."
    )


def _mean_reduce(accelerator):
    if accelerator.num_processes == 1:
        return None
    return lambda t: accelerator.reduce(t.to(accelerator.device), reduction="mean")
