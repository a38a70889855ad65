"""FSDP2 through Accelerate on CPU (gloo), launched with the shipped configs/accelerate/fsdp.yaml: 2 processes
x batch 2 == 1 process x batch 4, for LoRA and full fine-tuning, with the reference live and cached, on
tied and untied embeddings; checkpoints save whole weights, and a run killed with SIGKILL resumes to the
same result.

Accelerate 1.15 turns FSDP on for accelerators only, so these launches go through tests/accelerate_on_cpu.py,
which promotes that one decision (see its docstring); without it, dpokit refuses the launch
(test_distributed.py)."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from dpokit.checkpoint import latest_checkpoint
from dpokit.train import train
from helpers import ENV, assert_same_run, kill_tree, load_cfg, run_overrides

pytestmark = pytest.mark.slow  # several processes per test

ROOT = Path(__file__).resolve().parents[1]


def fsdp_launch(*args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(ROOT / "configs" / "accelerate" / "fsdp.yaml"),
        "--num_processes",
        "2",
        str(ROOT / "tests" / "accelerate_on_cpu.py"),
        *args,
    ]


@pytest.mark.parametrize(
    "lora, cached, tied, extra",
    [
        (True, False, False, []),
        (False, False, False, []),
        (True, True, False, []),
        (False, True, False, []),
        (False, False, True, []),
        # two micro-batches per process and step; LM-head chunks of 8 tokens (a different number per process)
        (True, False, False, ["train.grad_accum=2", "train.logps_chunk_size=8"]),
        (False, False, False, ["separate-reference"]),  # model.reference: another checkpoint, sharded too
    ],
    ids=[
        "lora-live-ref",
        "full-live-ref",
        "lora-cached-ref",
        "full-cached-ref",
        "full-tied-embeddings",
        "lora-accumulated-chunked",
        "full-separate-ref",
    ],
)
def test_two_sharded_processes_match_one(tmp_path, tiny_model_dir, tied_model_dir, lora, cached, tied, extra):
    model = tied_model_dir if tied else tiny_model_dir
    extra = [f"model.reference={tied_model_dir}" if e == "separate-reference" else e for e in extra]
    common = [
        *extra,
        "data.limit=40",
        "data.eval_fraction=0.2",
        f"lora.enabled={str(lora).lower()}",
        "train.lr=1e-3" if lora else "train.lr=1e-4",
        f"train.precompute_ref={str(cached).lower()}",
        f"train.ref_cache_dir={tmp_path / 'cache'}",
        "eval.batch_size=4",
        "eval.every=2",
        "train.save_final=true",
    ]
    one = train(load_cfg(model, tmp_path / "one", *common)).run_dir
    two = tmp_path / "two"
    out = subprocess.run(
        fsdp_launch("train", *run_overrides(model, two, *common, "train.batch_size=2")),
        capture_output=True,
        text=True,
        timeout=300,
        env=ENV,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    name = "adapter_model.safetensors" if lora else "model.safetensors"
    assert_same_run(one, two, f"checkpoints/step-3/{name}")
    if tied:  # one tensor for the tied pair, as save_pretrained writes it
        assert "lm_head.weight" not in load_file(str(two / "checkpoints/step-3" / name))
    if cached:  # the second process found the cache the first filled: one key for the sharded weights
        summary = json.loads((two / "summary.json").read_text())
        assert summary["reference"]["train"]["computed"] > 0


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_sigkill_under_fsdp_then_resume_gives_the_same_result(tmp_path, tiny_model_dir, lora):
    common = [
        "data.limit=40",
        "data.eval_fraction=0.2",
        f"lora.enabled={str(lora).lower()}",
        "train.lr=1e-3" if lora else "train.lr=1e-4",
        "train.max_steps=8",
        "train.checkpoint_every=1",
        "eval.batch_size=4",
        "eval.every=3",
        "train.save_final=true",
    ]
    one = train(load_cfg(tiny_model_dir, tmp_path / "one", *common)).run_dir
    run = tmp_path / "killed"
    proc = subprocess.Popen(
        fsdp_launch("train", *run_overrides(tiny_model_dir, run, *common, "train.batch_size=2")),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=ENV,
    )
    deadline = time.time() + 300
    while not (run / "checkpoints" / "step-3").exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.01)
    kill_tree(proc.pid)
    proc.wait()
    interrupted_at = int(latest_checkpoint(run).name.split("-")[1])
    assert 3 <= interrupted_at < 8, interrupted_at

    out = subprocess.run(
        fsdp_launch("train", "--resume", str(run)), capture_output=True, text=True, timeout=300, env=ENV
    )
    assert out.returncode == 0, out.stderr[-3000:]
    name = "adapter_model.safetensors" if lora else "model.safetensors"
    assert_same_run(one, run, f"checkpoints/step-8/{name}")
    assert json.loads((run / "summary.json").read_text())["steps"] == 8


def test_processes_with_different_cache_hits_compute_in_lockstep(tmp_path, tiny_model_dir):
    """A sharded forward needs every process: when the cache holds some processes' micro-batches and not the
    others', the processes still run the same number of forwards (no hang), and the run equals one process."""
    common = [
        "data.limit=40",
        "data.eval_fraction=0.2",
        "train.precompute_ref=true",
        f"train.ref_cache_dir={tmp_path / 'cache'}",
        "eval.batch_size=4",
        "train.save_final=true",
    ]
    # one process, micro-batches of 2, one step: fills the first micro-batch of process 0 only
    train(load_cfg(tiny_model_dir, tmp_path / "fill", *common, "train.batch_size=2", "train.max_steps=1"))
    one = train(load_cfg(tiny_model_dir, tmp_path / "one", *common)).run_dir
    two = tmp_path / "two"
    out = subprocess.run(
        fsdp_launch("train", *run_overrides(tiny_model_dir, two, *common, "train.batch_size=2")),
        capture_output=True,
        text=True,
        timeout=300,
        env=ENV,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    process_0 = json.loads((two / "summary.json").read_text())["reference"]["train"]
    assert process_0["reused"] == 1 and process_0["computed"] == process_0["batches"] - 1, process_0
    assert_same_run(one, two, "checkpoints/step-3/adapter_model.safetensors")


def test_precompute_ref_under_fsdp_fills_the_cache_the_run_reads(tmp_path, tiny_model_dir):
    """`dpokit precompute-ref` prepares the policy as the run does (FSDP2 prepares a model only with an
    optimizer), so the run that follows computes nothing and still equals one process."""
    common = [
        "lora.enabled=false",
        "train.lr=1e-4",
        "train.precompute_ref=true",
        f"train.ref_cache_dir={tmp_path / 'cache'}",
        "train.save_final=true",
    ]
    sharded = [*common, "train.batch_size=2"]
    out = subprocess.run(
        fsdp_launch("precompute-ref", *run_overrides(tiny_model_dir, tmp_path / "unused", *sharded)),
        capture_output=True,
        text=True,
        timeout=300,
        env=ENV,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    two = tmp_path / "two"
    out = subprocess.run(
        fsdp_launch("train", *run_overrides(tiny_model_dir, two, *sharded)),
        capture_output=True,
        text=True,
        timeout=300,
        env=ENV,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    reference = json.loads((two / "summary.json").read_text())["reference"]
    assert reference["train"]["computed"] == reference["eval"]["computed"] == 0, reference
    one = train(load_cfg(tiny_model_dir, tmp_path / "one", *common)).run_dir
    assert_same_run(one, two, "checkpoints/step-3/model.safetensors")
