"""DeepSpeed ZeRO-2 and ZeRO-3 through Accelerate on CPU (gloo), launched with the shipped
configs/accelerate/deepspeed_zero{2,3}.yaml: 2 processes x batch 2 == 1 process x batch 4, for LoRA and full
fine-tuning, the reference live (ZeRO-3: a DeepSpeed inference engine of its own) and cached; checkpoints
hold whole weights, and a run killed with SIGKILL resumes to the same result.

DeepSpeed runs here on its CPU accelerator; Accelerate 1.15 counts one process in each under DeepSpeed
without CUDA, which tests/accelerate_on_cpu.py corrects (see its docstring). The package comes with `make
test` (`make deepspeed`); without it these tests skip, except under CI=true, where they fail."""

import importlib.util
import json
import os

import pytest
from safetensors.torch import load_file

from dpokit.cli import main
from dpokit.loop import train
from helpers import (
    assert_same_run,
    cli_args,
    killed_then_resumed_matches_one,
    load_cfg,
    run_engine,
    run_overrides,
    two_processes_match_one,
)

pytestmark = pytest.mark.slow  # several processes per test


@pytest.fixture(autouse=True)
def deepspeed_installed():
    if importlib.util.find_spec("deepspeed") is None:
        reason = "deepspeed is not installed (make deepspeed)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}: `make test` installs it")
        pytest.skip(reason)


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
    name = "adapter_model.safetensors" if lora else "model.safetensors"
    two = two_processes_match_one(f"deepspeed_zero{stage}", model, tmp_path, common, name)
    if model is tied_model_dir:
        assert "lm_head.weight" not in load_file(str(two / "checkpoints/step-3" / name))


def test_precompute_ref_under_zero3_fills_the_cache_the_run_reads(tmp_path, tiny_model_dir):
    common = [
        "lora.enabled=false",
        "train.lr=1e-4",
        "train.precompute_ref=true",
        f"train.ref_cache_dir={tmp_path / 'cache'}",
        "train.save_final=true",
        "train.device=auto",
    ]
    sharded = [*common, "train.batch_size=2"]
    run_engine(
        "deepspeed_zero3", "precompute-ref", *run_overrides(tiny_model_dir, tmp_path / "unused", *sharded)
    )
    run_engine("deepspeed_zero3", "train", *run_overrides(tiny_model_dir, tmp_path / "two", *sharded))
    reference = json.loads((tmp_path / "two" / "summary.json").read_text())["reference"]
    assert reference["train"]["computed"] == reference["eval"]["computed"] == 0, reference
    one = train(load_cfg(tiny_model_dir, tmp_path / "one", *common)).run_dir
    assert_same_run(one, tmp_path / "two", "checkpoints/step-3/model.safetensors")


@pytest.mark.parametrize("stage, lora", [(2, True), (3, False)], ids=["zero2-lora", "zero3-full"])
def test_sigkill_under_deepspeed_then_resume_gives_the_same_result(tmp_path, tiny_model_dir, stage, lora):
    """Each process writes its ZeRO partition with DeepSpeed's own checkpointing into the step checkpoint
    (`deepspeed/`); a run killed with SIGKILL resumes from it to the metrics and weights of one process."""
    common = [
        "data.limit=40",
        "data.eval_fraction=0.2",
        f"lora.enabled={str(lora).lower()}",
        "train.lr=1e-3" if lora else "train.lr=1e-4",
        "eval.batch_size=4",
        "train.save_final=true",
        "train.device=auto",
    ]
    name = "adapter_model.safetensors" if lora else "model.safetensors"
    latest = killed_then_resumed_matches_one(f"deepspeed_zero{stage}", tiny_model_dir, tmp_path, common, name)
    assert sorted(p.name for p in (latest / "deepspeed" / "zero").iterdir() if "optim" in p.name) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    ]


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


def test_a_non_finite_step_under_deepspeed_says_the_update_was_applied(tmp_path, tiny_model_dir):
    """The engine steps inside backward, before the loop sees the loss: the run stops, says so, and names the
    newest checkpoint instead of saving the weights of the last good step (they are gone)."""
    import subprocess

    from helpers import ENV, engine_argv

    run = tmp_path / "run"
    overrides = ["train.lr=1e30", "train.max_grad_norm=0", "train.max_steps=6", "lora.enabled=false"]
    argv = engine_argv(
        "deepspeed_zero2",
        "train",
        *run_overrides(tiny_model_dir, run, *overrides, "train.checkpoint_every=1", "train.batch_size=2"),
    )
    out = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=ENV)
    assert out.returncode != 0
    assert (
        "is not finite, and DeepSpeed applied the update inside backward; the newest checkpoint is"
        in out.stderr
    )
    summary = json.loads((run / "summary.json").read_text())
    assert "last-good" not in (summary["checkpoint"] or "") and not list(run.glob("checkpoints/*last-good*"))
