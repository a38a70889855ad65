"""`python tests/accelerate_on_cpu.py ARGS...` = `dpokit ARGS...`, with Accelerate's FSDP and DeepSpeed set up
for CPU processes as it sets them up for GPUs. Launch it like dpokit, with an engine config's environment
(`accelerate launch --config_file configs/accelerate/fsdp.yaml tests/accelerate_on_cpu.py train ...`).

Accelerate 1.15 does not run these engines on CPU processes, in two decisions this harness corrects, after
Accelerate has made them; everything else runs as on GPUs (Accelerate's FSDP2 preparation: `fully_shard`
over gloo; DeepSpeed's engine and ZeRO optimizers over gloo; dpokit's loop, checkpoints and references):

- FSDP: AcceleratorState turns FSDP on for accelerators only; on CPU an FSDP launch is data parallel
  (MULTI_CPU). Promoted to FSDP.
- DeepSpeed: without CUDA, PartialState has no backend of its own, so after DeepSpeed joins the processes
  it still counts one (num_processes 1, process_index 0 in every process). Given the ranks DeepSpeed's
  process group has.

Without this harness dpokit refuses both launches on CPU, with the reason (tests/test_distributed.py).
"""

import accelerate.state
from accelerate.utils import DistributedType

_accelerator_state = accelerate.state.AcceleratorState.__init__
_partial_state = accelerate.state.PartialState.__init__


def _fsdp_on_cpu(self, *args, **kwargs):
    _accelerator_state(self, *args, **kwargs)
    plugin = kwargs.get("fsdp_plugin")
    if plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = plugin


def _deepspeed_ranks_on_cpu(self, *args, **kwargs):
    _partial_state(self, *args, **kwargs)
    import torch.distributed as dist

    if (
        self.distributed_type == DistributedType.DEEPSPEED
        and self.num_processes == 1
        and dist.is_initialized()
    ):
        self.num_processes = dist.get_world_size()
        self.process_index = dist.get_rank()
        self.local_process_index = dist.get_rank()  # one machine


accelerate.state.AcceleratorState.__init__ = _fsdp_on_cpu
accelerate.state.PartialState.__init__ = _deepspeed_ranks_on_cpu

if __name__ == "__main__":
    import runpy

    runpy.run_module("dpokit.cli", run_name="__main__")  # as `python -m dpokit.cli`, its way out included
