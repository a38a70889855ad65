"""A policy that Accelerate shards (FSDP2, or DeepSpeed ZeRO-3): each process holds a slice of every parameter
(a DTensor; a ZeRO-3 partition), and every forward gathers the slices, a collective that all processes enter
together. What dpokit does differently for such a policy lives here; for a whole (unsharded, DDP, ZeRO-1/2)
policy each function is the plain operation.

- checkpoints hold whole tensors (a checkpoint loads with `from_pretrained` whatever wrote it): the weights
  and the optimizer state are gathered on process 0 for writing and sharded again on loading;
- the reference of full fine-tuning is a copy of the starting weights sharded like the policy;
- the reference cache's key hashes whole tensors (every process finds the same folder);
- where processes would run different numbers of forwards (the reference cache's misses), they agree on
  the largest count and the others run a discarded forward (`lockstep`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from torch import nn
from torch.distributed.tensor import DTensor


def is_sharded(module: nn.Module) -> bool:
    """Whether Accelerate sharded `module` or a module within it: FSDP2 (its parameters are DTensors, except
    while a forward has them gathered) or ZeRO-3 (partitioned parameters)."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in module.modules()) or zero3(module)


def zero3(module: nn.Module) -> bool:
    return any(hasattr(p, "ds_tensor") for p in module.parameters())


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a shard or partition (collective), or the tensor itself."""
    if isinstance(tensor, DTensor):
        return tensor.full_tensor()
    if hasattr(tensor, "ds_tensor"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([tensor]):
            return tensor.detach().clone()
    return tensor


def steps_in_backward(accelerator) -> bool:
    """DeepSpeed: its engine clips and steps inside the backward of a step's last micro-batch (the optimizer's
    step() is then a no-op), and its optimizer state lives in per-process partitions (save_engine_state)."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


def _options(**kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


def model_state(accelerator, root: nn.Module, model: nn.Module) -> dict | None:
    """Whole weights of a sharded `model` (the causal LM in the prepared policy `root`) on process 0, on CPU,
    for save_pretrained's `state_dict`; None for a whole model (save_pretrained reads it itself). Every
    process calls this."""
    if not is_sharded(model):
        return None
    if zero3(model):  # Accelerate gathers ZeRO-3 partitions module by module; the keys are the root's
        unwrapped = accelerator.unwrap_model(root)
        prefix = next(f"{n}." for n, m in unwrapped.named_modules() if m is model)
        state = {k.removeprefix(prefix): v for k, v in (accelerator.get_state_dict(root) or {}).items()}
    else:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        state = get_model_state_dict(model, options=_options(cpu_offload=True))
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(base.config, "tie_word_embeddings", False):  # one tensor, as save_pretrained writes it
        head = base.get_output_embeddings()
        state.pop(next(f"{n}.weight" for n, m in model.named_modules() if m is head), None)
    return state


def load_model_state(model: nn.Module, state: dict) -> None:
    """Copy whole weights (some or all of the model's, by name) into a sharded model; every process calls
    this with the same `state`."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(model, state, options=_options(strict=False))


def optimizer_state(root: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's state: whole tensors keyed by parameter name on process 0 for a sharded `root` (the
    prepared policy), else its own state_dict(). Every process calls this."""
    if not is_sharded(root):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    inner = getattr(optimizer, "optimizer", optimizer)  # Accelerate's wrapper holds the torch optimizer
    return get_optimizer_state_dict(root, inner, options=_options(cpu_offload=True))


def load_optimizer_state(root: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    if not is_sharded(root):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    inner = getattr(optimizer, "optimizer", optimizer)
    set_optimizer_state_dict(root, inner, state, options=_options())


ENGINE_STATE = "deepspeed"
"""The folder of a step checkpoint that holds DeepSpeed's own checkpoint of its engine (ZeRO partitions)."""


def save_engine_state(accelerator, engine, staging: Path) -> Path:
    """DeepSpeed keeps the optimizer state (and, ZeRO-3, the fp32 weights) in per-process partitions, in objects
    of its own: every process writes its partition with the engine's own checkpointing into `staging` (one
    folder, on storage all processes share), which process 0 then moves into the checkpoint. Frozen weights
    are left out: the checkpoint holds them whole beside."""
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)  # a save a crash interrupted
    accelerator.wait_for_everyone()
    engine.save_checkpoint(str(staging), tag="zero", save_latest=False, exclude_frozen_parameters=True)
    accelerator.wait_for_everyone()
    return staging


def load_engine_state(engine, folder: Path) -> None:
    """The engine's weights, optimizer partitions and step counts as save_engine_state wrote them. DeepSpeed
    reads its files with pickle (they hold objects of its own): files of dpokit's own checkpoints."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is missing: the checkpoint was not written under DeepSpeed")
    engine.load_checkpoint(
        str(folder),
        tag="zero",
        load_module_strict=False,
        load_optimizer_states=True,
        load_lr_scheduler_states=False,
    )


def shard_like(accelerator, module: nn.Module) -> nn.Module:
    """A frozen CompletionLogps (a reference) sharded as the policy is: by Accelerate's FSDP2 preparation
    function (its `prepare` refuses a model without an optimizer), or as a ZeRO-3 inference engine of
    DeepSpeed's (on the run's DeepSpeed config); else unchanged."""
    if getattr(accelerator, "is_fsdp2", False):
        from accelerate.utils.fsdp_utils import fsdp2_prepare_model

        return fsdp2_prepare_model(accelerator, module)
    plugin = getattr(accelerator.state, "deepspeed_plugin", None) if accelerator is not None else None
    if plugin is not None and plugin.zero_stage == 3:
        import copy

        import deepspeed

        config = {
            k: v
            for k, v in copy.deepcopy(plugin.deepspeed_config).items()
            if k not in ("optimizer", "scheduler")
        }
        one_head_call(module)
        engine, *_ = deepspeed.initialize(model=module, config=config)
        engine.eval()  # (DeepSpeed's eval() returns None)
        return engine
    return module


def one_head_call(network: nn.Module) -> None:
    """Under ZeRO-3, a CompletionLogps runs its LM head on all of a batch's completion tokens at once: ZeRO-3
    gathers the head's weights at every call, so every process must call it equally often, and the number of
    chunks of train.logps_chunk_size differs between processes (with it, runs hang)."""
    import sys

    network.chunk_size = sys.maxsize


def lockstep(count: int, module: nn.Module) -> int:
    """The largest `count` over all processes when `module` is sharded (its forwards are collectives),
    else `count`."""
    if not is_sharded(module):
        return count
    import torch.distributed as dist

    t = torch.tensor([count], device=next(module.parameters()).device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())
