"""Data parallel through Accelerate on CPU (gloo): 2 processes x batch 2 == 1 process x batch 4."""

import pytest
import torch
from safetensors.torch import load_file

from dpokit.cli import main
from dpokit.files import read_jsonl as read_metrics
from dpokit.loop import train
from helpers import DISTRIBUTED_KEYS as KEYS
from helpers import cli_args, load_cfg

pytestmark = pytest.mark.slow  # several processes per test


@pytest.mark.parametrize(
    "lora, extra",
    [
        ("true", []),
        ("false", []),
        ("true", ["train.precompute_ref=true", "train.packing=true", "train.prefix_sharing=true"]),
        ("true", ["eval.batch_size=8"]),  # 8 eval pairs: process 1 gets no eval batch at all
    ],
    ids=[
        "lora-adapter-ref",
        "full-frozen-copy",
        "lora-cached-ref-packed",
        "lora-one-process-without-eval-batch",
    ],
)
def test_two_processes_match_one(tmp_path, tiny_model_dir, lora, extra):
    lr = "train.lr=1e-3" if lora == "true" else "train.lr=1e-4"
    common = [
        "data.limit=40",
        "data.eval_fraction=0.2",
        f"lora.enabled={lora}",
        lr,
        "eval.batch_size=4",
        "eval.every=2",
        "train.save_final=true",
        f"train.ref_cache_dir={tmp_path / 'cache'}",
        *extra,
    ]
    one = train(load_cfg(tiny_model_dir, tmp_path / "one", *common))
    two_dir = tmp_path / "two"
    assert (
        main([*cli_args(tiny_model_dir, two_dir, *common, "train.batch_size=2"), "--num-processes", "2"]) == 0
    )
    a, b = read_metrics(one.run_dir / "metrics.jsonl"), read_metrics(two_dir / "metrics.jsonl")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [0, 1, 2, 3]
    for ra, rb in zip(a, b, strict=True):
        for key in KEYS:
            if key in ra:
                assert rb[key] == pytest.approx(ra[key], rel=1e-5, abs=1e-5), (ra["step"], key)
    name = "adapter_model.safetensors" if lora == "true" else "model.safetensors"
    wa = load_file(str(one.checkpoint / name))
    wb = load_file(str(two_dir / "checkpoints" / "step-3" / name))
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)


def test_processes_exit_cleanly(tmp_path, tiny_model_dir):
    """gloo aborted a process at interpreter exit at random (`terminate called without an active exception`,
    about 1 run in 4 here); the processes now tear the group down and leave without finalizing: three runs
    in a row all end cleanly."""
    import os
    import subprocess
    import sys

    from helpers import cli_args

    for i in range(3):
        args = [
            *cli_args(
                tiny_model_dir, tmp_path / f"r{i}", "train.batch_size=2", "train.max_steps=1", "data.limit=8"
            ),
            "--num-processes",
            "2",
        ]
        out = subprocess.run(
            [sys.executable, "-m", "dpokit.cli", *args],
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        assert out.returncode == 0 and "terminate called" not in out.stderr, out.stderr


def test_device_auto_on_a_cpu_machine_joins_the_processes(tmp_path, tiny_model_dir):
    """`--num-processes 2` with train.device=auto and no CUDA: Accelerate's cpu flag is set, so the two
    processes form one data-parallel run (before, each trained alone into the same run dir)."""
    if torch.cuda.is_available():
        pytest.skip("this is about CPU machines")
    one = train(load_cfg(tiny_model_dir, tmp_path / "one", "train.device=auto"))
    args = cli_args(tiny_model_dir, tmp_path / "two", "train.device=auto", "train.batch_size=2")
    assert main([*args, "--num-processes", "2"]) == 0
    a, b = read_metrics(one.run_dir / "metrics.jsonl"), read_metrics(tmp_path / "two" / "metrics.jsonl")
    for ra, rb in zip(a, b, strict=True):
        for key in ("loss", "grad_norm", "rewards/margins"):
            if key in ra:
                assert rb[key] == pytest.approx(ra[key], rel=1e-5, abs=1e-5), (ra["step"], key)


@pytest.mark.parametrize(
    ("engine", "said"),
    [
        ("FSDP", "FSDP was asked for (ACCELERATE_USE_FSDP=true)"),
        ("DEEPSPEED", "processes were launched under DeepSpeed, but without CUDA Accelerate"),
    ],
)
def test_fsdp_or_deepspeed_asked_for_on_a_cpu_is_refused_before_anything_is_written(
    tmp_path, tiny_model_dir, engine, said
):
    """Accelerate turns FSDP on for accelerators only: on CPU the launch would silently run DDP
    (train.device=cpu) or unjoined processes (auto). Under DeepSpeed without CUDA it counts one process in
    each, so each would train on all the data. Both are refused, in every process, with the reason, before
    anything is written (tests/accelerate_on_cpu.py corrects both decisions: test_fsdp.py,
    test_deepspeed.py)."""
    import importlib.util
    import os
    import subprocess
    import sys

    if torch.cuda.is_available():
        pytest.skip("this is about CPU machines")
    if engine == "DEEPSPEED" and importlib.util.find_spec("deepspeed") is None:
        said = "but the deepspeed package is not installed: pip install deepspeed"
    env = {**os.environ, f"ACCELERATE_USE_{engine}": "true", "FSDP_VERSION": "2", "OMP_NUM_THREADS": "1"}
    for device in ("cpu", "auto"):
        run = tmp_path / device
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc-per-node",
                "2",
                "-m",
                "dpokit.cli",
                *cli_args(tiny_model_dir, run, f"train.device={device}"),
            ],
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
        )
        assert out.returncode != 0 and said in out.stderr, out.stderr[-2000:]
        assert not run.exists()


def test_two_nodes_of_one_process_on_localhost_match_one_process(tmp_path, tiny_model_dir):
    """The multi-node launch of the README, as 2 machines x 1 process on 127.0.0.1: torch.distributed.run
    on each node with --nnodes 2 --node-rank R and the first node's address; equal to one process."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    one = train(load_cfg(tiny_model_dir, tmp_path / "one", "train.save_final=true"))
    run = tmp_path / "two"
    args = cli_args(tiny_model_dir, run, "train.batch_size=2", "train.save_final=true", "train.device=auto")
    nodes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes",
                "2",
                "--node-rank",
                str(rank),
                "--nproc-per-node",
                "1",
                "--master-addr",
                "127.0.0.1",
                "--master-port",
                str(port),
                "-m",
                "dpokit.cli",
                *args,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        for rank in (0, 1)
    ]
    for node in nodes:
        _, err = node.communicate(timeout=300)
        assert node.returncode == 0, err[-2000:]
    a, b = read_metrics(one.run_dir / "metrics.jsonl"), read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b, strict=True):
        for key in KEYS:
            if key in ra:
                assert rb[key] == pytest.approx(ra[key], rel=1e-5, abs=1e-5), (ra["step"], key)
    wa = load_file(str(one.checkpoint / "adapter_model.safetensors"))
    wb = load_file(str(run / "checkpoints" / "step-3" / "adapter_model.safetensors"))
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)


def test_a_reward_model_trains_the_same_in_two_processes(tmp_path, tiny_model_dir):
    """`dpokit train-rm --num-processes 2` at batch 2 each == one process at batch 4, and the reward model
    is written once."""
    from helpers import run_overrides

    common = [
        "data.limit=40",
        "data.eval_fraction=0.2",
        "eval.batch_size=4",
        "eval.every=2",
        "train.save_final=true",
    ]
    one = tmp_path / "one"
    assert main(["train-rm", *run_overrides(tiny_model_dir, one, *common)]) == 0
    two = tmp_path / "two"
    argv = [
        "train-rm",
        *run_overrides(tiny_model_dir, two, *common, "train.batch_size=2"),
        "--num-processes",
        "2",
    ]
    assert main(argv) == 0
    a, b = read_metrics(one / "metrics.jsonl"), read_metrics(two / "metrics.jsonl")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [0, 1, 2, 3]
    for ra, rb in zip(a, b, strict=True):
        for key in KEYS:
            if key in ra:
                assert rb[key] == pytest.approx(ra[key], rel=1e-5, abs=1e-5), (ra["step"], key)
    wa = load_file(str(one / "reward_model" / "model.safetensors"))
    wb = load_file(str(two / "reward_model" / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)
