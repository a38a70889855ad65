"""What every test file (and the benchmarks) share: where the shared data lives and one config factory for
short runs on the tiny model. Each test states only what it changes."""

from __future__ import annotations

import os
from pathlib import Path

from dpokit.config import Config, load_config

TEST_DEVICE = os.environ.get("DPOKIT_TEST_DEVICE", "cpu")
"""Where the device-sensitive tests (test_layouts.py) run: cpu, or cuda (benchmarks/gpu_check.sh)."""

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
HH_HELPFUL = SHARED_DATA / "hh-rlhf" / "helpful-base" / "test.jsonl.gz"
KTO_DEMO = SHARED_DATA / "llama-factory" / "kto_en_demo.json"

TINY_RUN = (
    "data.train=builtin:demo",
    "data.limit=24",
    "data.eval_fraction=0.25",
    "lora.r=4",
    "train.batch_size=4",
    "train.max_steps=3",
    "train.lr=1e-3",
    "train.device=cpu",
    "train.progress=false",
    "train.save_final=false",
)
"""A short LoRA run on the shipped demo pairs: 18 train / 6 eval pairs, 3 steps of 4 pairs."""

TINY_ITERATE = (
    "lora.r=4",
    "data.max_length=128",
    "data.max_prompt_length=64",
    "train.batch_size=4",
    "train.epochs=1",
    "train.lr=1e-3",
    "train.bf16=false",
    "train.device=cpu",
    "train.progress=false",
    "train.checkpoint_every=1",
    "iterate.rounds=2",
    "iterate.prompts=builtin:reviews",
    "iterate.prompts_split=train",
    "iterate.prompts_per_round=6",
    "iterate.samples_per_prompt=4",
    "iterate.max_new_tokens=10",
    "iterate.reward=length",
    "iterate.eval_prompts=builtin:reviews",
    "iterate.eval_split=eval",
    "iterate.eval_num_prompts=4",
)
"""`dpokit iterate` on the tiny model: 2 rounds of 6 fresh prompts x 4 samples of 10 tokens, scored by length
(the random model's text carries no sentiment: VADER would call every pair a tie), 4 held-out prompts."""


def run_overrides(model_dir, run_dir, *extra: str) -> list[str]:
    """TINY_RUN on `model_dir`, writing to `run_dir`; later overrides win."""
    return [f"model.name={model_dir}", *TINY_RUN, f"train.run_dir={run_dir}", *extra]


def load_cfg(model_dir, run_dir, *extra: str) -> Config:
    return load_config(None, run_overrides(model_dir, run_dir, *extra))


def cli_args(model_dir, run_dir, *extra: str) -> list[str]:
    """`dpokit train` arguments of the same run."""
    return ["train", *run_overrides(model_dir, run_dir, *extra)]


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
"""The environment of launched processes: one thread each (2 processes on 2 cores)."""

DISTRIBUTED_KEYS = (
    "loss",
    "grad_norm",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "eval/loss",
    "eval/rewards/margins",
    "eval/rewards/accuracies",
)
"""The metrics a run of several processes is held to, against one process (rel and abs 1e-5)."""


def assert_same_run(one: Path, two: Path, weights: str) -> None:
    """Two run dirs agree: the steps, DISTRIBUTED_KEYS at each, and the weights file `weights` (1e-5)."""
    import pytest
    import torch
    from safetensors.torch import load_file

    from dpokit.files import read_jsonl as read_metrics

    a, b = read_metrics(Path(one) / "metrics.jsonl"), read_metrics(Path(two) / "metrics.jsonl")
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b, strict=True):
        assert ra.keys() == rb.keys()
        for key in DISTRIBUTED_KEYS:
            if key in ra:
                assert rb[key] == pytest.approx(ra[key], rel=1e-5, abs=1e-5), (ra["step"], key)
    wa, wb = load_file(str(Path(one) / weights)), load_file(str(Path(two) / weights))
    assert wa.keys() == wb.keys()
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5, rtol=0) for k in wa)


def kill_tree(pid: int) -> None:
    """SIGKILL a launcher and every process under it at once, as a scheduler or the OOM killer ends a job: the
    workers of torch.distributed.run run in sessions of their own, beyond the reach of a process-group kill."""
    import psutil

    root = psutil.Process(pid)
    victims = [root, *root.children(recursive=True)]
    for proc in victims:
        proc.kill()
    psutil.wait_procs(victims, timeout=30)


def engine_argv(config: str, *args: str) -> list[str]:
    """2 processes of `dpokit ARGS` through `accelerate launch` with configs/accelerate/CONFIG.yaml, via
    tests/accelerate_on_cpu.py (FSDP and DeepSpeed on CPU processes: see that file)."""
    import sys

    root = Path(__file__).resolve().parents[1]
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(root / "configs" / "accelerate" / f"{config}.yaml"),
        "--num_processes",
        "2",
        str(root / "tests" / "accelerate_on_cpu.py"),
        *args,
    ]


def run_engine(config: str, *args: str) -> None:
    """engine_argv run to its end; it must succeed."""
    import subprocess

    out = subprocess.run(engine_argv(config, *args), capture_output=True, text=True, timeout=300, env=ENV)
    assert out.returncode == 0, out.stderr[-3000:]


def two_processes_match_one(config: str, model_dir, tmp_path: Path, common: list[str], weights: str) -> Path:
    """One process at batch 4 against two under `config` at batch 2 each: assert_same_run on `weights` (a
    file of the final checkpoint, step 3). Returns the two-process run dir."""
    from dpokit.loop import train

    one = train(load_cfg(model_dir, tmp_path / "one", *common)).run_dir
    two = tmp_path / "two"
    run_engine(config, "train", *run_overrides(model_dir, two, *common, "train.batch_size=2"))
    assert_same_run(one, two, f"checkpoints/step-3/{weights}")
    return two


def killed_then_resumed_matches_one(config: str, model_dir, tmp_path: Path, common: list[str], weights: str):
    """8 steps with a checkpoint after each, under `config`: SIGKILLed (launcher and workers) once step 3 is
    saved, resumed with `train --resume`; equal to one uninterrupted process (metrics and `weights`)."""
    import json
    import subprocess
    import time

    from dpokit.loop import train
    from dpokit.rundir import Run

    common = [*common, "train.max_steps=8", "train.checkpoint_every=1", "eval.every=3"]
    one = train(load_cfg(model_dir, tmp_path / "one", *common)).run_dir
    run = tmp_path / "killed"
    argv = engine_argv(config, "train", *run_overrides(model_dir, run, *common, "train.batch_size=2"))
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    deadline = time.time() + 300
    while not (run / "checkpoints" / "step-3").exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.01)
    kill_tree(proc.pid)
    proc.wait()
    latest = Run(run).latest_checkpoint
    assert 3 <= int(latest.name.split("-")[1]) < 8, latest
    run_engine(config, "train", "--resume", str(run))
    assert_same_run(one, run, f"checkpoints/step-8/{weights}")
    assert json.loads((run / "summary.json").read_text())["steps"] == 8
    return latest


def copy_run(result, dest: Path) -> Path:
    """A copy of a finished run (the tiny_lora_run fixture's) that a test may change: run dirs are
    relocatable (the summary names its checkpoint relative to the run dir)."""
    import shutil

    shutil.copytree(result.run_dir, dest)
    return Path(dest)
