"""DeepSpeed ZeRO-2 and ZeRO-3 through Accelerate on CPU (gloo), launched with the shipped
configs/accelerate/deepspeed_zero{2,3}.yaml: 2 processes x batch 2 == 1 process x batch 4, for LoRA and full
fine-tuning, the reference live (ZeRO-3: a DeepSpeed inference engine of its own) and cached; checkpoints
hold whole weights, and a run killed with SIGKILL resumes to the same result.

DeepSpeed runs here on its CPU accelerator; Accelerate 1.15 counts one process in each under DeepSpeed
without CUDA, which tests/accelerate_on_cpu.py corrects (see its docstring). The package comes with `make
test` (`make deepspeed`); without it these tests skip, except under CI=true, where they fail."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from dpokit.cli import main
from dpokit.train import train
from helpers import ENV, assert_same_run, cli_args, kill_tree, load_cfg, run_overrides

pytestmark = pytest.mark.slow  # several processes per test

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def deepspeed_installed():
    if importlib.util.find_spec("deepspeed") is None:
        reason = "deepspeed is not installed (make deepspeed)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}: `make test` installs it")
        pytest.skip(reason)


def deepspeed_launch(stage: int, *args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(ROOT / "configs" / "accelerate" / f"deepspeed_zero{stage}.yaml"),
        "--num_processes",
        "2",
        str(ROOT / "tests" / "accelerate_on_cpu.py"),
        *args,
    ]


@pytest.mark.parametrize(
    "stage, lora, extra",
    [
        (2, True, []),
        (2, False, []),
        (3, True, []),
        (3, False, []),
        (3, False, ["train.precompute_ref=true"]),
        # two micro-batches per process and step; LM-head chunks of 8 tokens (a different number per process)
        (3, True, ["train.grad_accum=2", "train.logps_chunk_size=8"]),
        (3, False, ["tied"]),
        (3, False, ["separate-reference"]),  # model.reference: another checkpoint, an engine of its own
    ],
    ids=[
        "zero2-lora",
        "zero2-full",
        "zero3-lora",
        "zero3-full-live-ref",
        "zero3-full-cached-ref",
        "zero3-lora-accumulated-chunked",
        "zero3-full-tied-embeddings",
        "zero3-full-separate-ref",
    ],
)
def test_two_deepspeed_processes_match_one(tmp_path, tiny_model_dir, tied_model_dir, stage, lora, extra):
    model = tied_model_dir if "tied" in extra else tiny_model_dir
    extra = [
        f"model.reference={tied_model_dir}" if e == "separate-reference" else e for e in extra if e != "tied"
    ]
    common = [
        "data.limit=40",
        "data.eval_fraction=0.2",
        f"lora.enabled={str(lora).lower()}",
        "train.lr=1e-3" if lora else "train.lr=1e-4",
        f"train.ref_cache_dir={tmp_path / 'cache'}",
        "eval.batch_size=4",
        "eval.every=2",
        "train.save_final=true",
        "train.device=auto",
        *extra,
    ]
    one = train(load_cfg(model, tmp_path / "one", *common)).run_dir
    two = tmp_path / "two"
    out = subprocess.run(
        deepspeed_launch(stage, "train", *run_overrides(model, two, *common, "train.batch_size=2")),
        capture_output=True,
        text=True,
        timeout=300,
        env=ENV,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    name = "adapter_model.safetensors" if lora else "model.safetensors"
    assert_same_run(one, two, f"checkpoints/step-3/{name}")
    if model is tied_model_dir:
        assert "lm_head.weight" not in load_file(str(two / "checkpoints/step-3" / name))


def test_precompute_ref_under_zero3_fills_the_cache_the_run_reads(tmp_path, tiny_model_dir):
    import json

    common = [
        "lora.enabled=false",
        "train.lr=1e-4",
        "train.precompute_ref=true",
        f"train.ref_cache_dir={tmp_path / 'cache'}",
        "train.save_final=true",
        "train.device=auto",
    ]
    sharded = [*common, "train.batch_size=2"]
    for command, run in (("precompute-ref", tmp_path / "unused"), ("train", tmp_path / "two")):
        out = subprocess.run(
            deepspeed_launch(3, command, *run_overrides(tiny_model_dir, run, *sharded)),
            capture_output=True,
            text=True,
            timeout=300,
            env=ENV,
        )
        assert out.returncode == 0, out.stderr[-3000:]
    reference = json.loads((tmp_path / "two" / "summary.json").read_text())["reference"]
    assert reference["train"]["computed"] == reference["eval"]["computed"] == 0, reference
    one = train(load_cfg(tiny_model_dir, tmp_path / "one", *common)).run_dir
    assert_same_run(one, tmp_path / "two", "checkpoints/step-3/model.safetensors")


@pytest.mark.parametrize("stage, lora", [(2, True), (3, False)], ids=["zero2-lora", "zero3-full"])
def test_sigkill_under_deepspeed_then_resume_gives_the_same_result(tmp_path, tiny_model_dir, stage, lora):
    """Each process writes its ZeRO partition with DeepSpeed's own checkpointing into the step checkpoint
    (`deepspeed/`); a run killed with SIGKILL resumes from it to the metrics and weights of one process."""
    import json
    import time

    from dpokit.checkpoint import latest_checkpoint

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
        "train.device=auto",
    ]
    one = train(load_cfg(tiny_model_dir, tmp_path / "one", *common)).run_dir
    run = tmp_path / "killed"
    proc = subprocess.Popen(
        deepspeed_launch(stage, "train", *run_overrides(tiny_model_dir, run, *common, "train.batch_size=2")),
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
    latest = latest_checkpoint(run)
    assert 3 <= int(latest.name.split("-")[1]) < 8, latest
    assert sorted(p.name for p in (latest / "deepspeed" / "zero").iterdir() if "optim" in p.name) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    ]
    out = subprocess.run(
        deepspeed_launch(stage, "train", "--resume", str(run)),
        capture_output=True,
        text=True,
        timeout=300,
        env=ENV,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    name = "adapter_model.safetensors" if lora else "model.safetensors"
    assert_same_run(one, run, f"checkpoints/step-8/{name}")
    assert json.loads((run / "summary.json").read_text())["steps"] == 8


def test_deepspeed_asked_for_without_the_package_is_one_clear_line(
    tmp_path, tiny_model_dir, monkeypatch, capsys
):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a)
    )
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    assert main(cli_args(tiny_model_dir, tmp_path / "run")) == 2
    assert "the deepspeed package is not installed: pip install deepspeed" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
