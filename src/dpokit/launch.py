"""Starting and ending processes: a data-parallel launch of `dpokit train --num-processes N`, and the
teardown every process of such a launch needs before it exits. The CLI calls these; the library never
starts, ends or exits a process."""

from __future__ import annotations

import logging
import os
import subprocess
import sys


def launched() -> bool:
    """This process is one of a launch's processes (torch.distributed.run / accelerate launch set RANK)."""
    return "RANK" in os.environ


def data_parallel(n: int, argv: list[str]) -> int:
    """Re-run this command in `n` processes; Accelerate sets up the process group in each (no home-made one).
    Returns the launcher's exit code.

    GPUs: `accelerate launch --multi_gpu`. CPU: `accelerate launch --cpu` starts a single process (its
    multi-CPU path needs mpirun), so PyTorch's own launcher `torch.distributed.run` starts the processes
    and `Accelerator(cpu=True)` joins them with gloo.
    """
    import torch

    rest, skip = [], False
    for a in argv:  # drop --num-processes N / --num-processes=N
        if skip:
            skip = False
        elif a == "--num-processes":
            skip = True
        elif not a.startswith("--num-processes="):
            rest.append(a)
    if torch.cuda.is_available():
        cmd = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            str(n),
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
        ]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n)]
    threads = max(1, (os.cpu_count() or 1) // n)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(threads))}
    return subprocess.call([*cmd, "-m", "dpokit", *rest], env=env)


def end_process_group(in_step: bool) -> None:
    """Tear the process group down before exit: gloo aborts a process (`terminate called without an active
    exception`) that exits while another still talks to it. `in_step`: every process got here together (a
    finished command), so they first wait for each other; after an error one may never come."""
    if "torch.distributed" not in sys.modules:  # nothing was started (and torch need not be imported)
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if in_step:
            dist.barrier()
        dist.destroy_process_group()


def exit_process(code: int) -> None:
    """End the process with `code`. A process of a data-parallel launch leaves without interpreter
    finalization: gloo's worker threads can abort it at random (SIGABRT: `terminate called without an
    active exception`), destroyed process group or not (seen 1 run in 4 here); everything is written and
    flushed by now."""
    if launched():
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
