"""FSDP2 through Accelerate on CPU (gloo), launched with the shipped configs/accelerate/fsdp.yaml: 2 processes
x batch 2 == 1 process x batch 4, for LoRA and full fine-tuning, with the reference live and cached, on
tied and untied embeddings; checkpoints save whole weights, and a run killed with SIGKILL resumes to the
same result.

Accelerate 1.15 turns FSDP on for accelerators only, so these launches go through tests/accelerate_on_cpu.py,
which promotes that one decision (see its docstring); without it, dpokit refuses the launch
(test_distributed.py)."""

import json

import pytest
from safetensors.torch import load_file

from dpokit.loop import train
from helpers import (
    assert_same_run,
    killed_then_resumed_matches_one,
    load_cfg,
    run_engine,
    run_overrides,
    two_processes_match_one,
)

pytestmark = pytest.mark.slow  # several processes per test


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
    name = "adapter_model.safetensors" if lora else "model.safetensors"
    two = two_processes_match_one("fsdp", model, tmp_path, common, name)
    if tied:  # one tensor for the tied pair, as save_pretrained writes it
        assert "lm_head.weight" not in load_file(str(two / "checkpoints/step-3" / name))
    if cached:  # the eval batches are the one process's: found under one key for sharded and whole weights
        assert json.loads((two / "summary.json").read_text())["reference"]["eval"] == {
            "batches": 1,
            "pairs": 4,
            "computed": 0,
            "reused": 1,
        }


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_sigkill_under_fsdp_then_resume_gives_the_same_result(tmp_path, tiny_model_dir, lora):
    common = [
        "data.limit=40",
        "data.eval_fraction=0.2",
        f"lora.enabled={str(lora).lower()}",
        "train.lr=1e-3" if lora else "train.lr=1e-4",
        "eval.batch_size=4",
        "train.save_final=true",
    ]
    name = "adapter_model.safetensors" if lora else "model.safetensors"
    killed_then_resumed_matches_one("fsdp", tiny_model_dir, tmp_path, common, name)


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
    two = two_processes_match_one("fsdp", tiny_model_dir, tmp_path, common, "adapter_model.safetensors")
    process_0 = json.loads((two / "summary.json").read_text())["reference"]["train"]
    assert process_0["reused"] == 1 and process_0["computed"] == process_0["batches"] - 1, process_0


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
    run_engine("fsdp", "precompute-ref", *run_overrides(tiny_model_dir, tmp_path / "unused", *sharded))
    two = tmp_path / "two"
    run_engine("fsdp", "train", *run_overrides(tiny_model_dir, two, *sharded))
    reference = json.loads((two / "summary.json").read_text())["reference"]
    assert reference["train"]["computed"] == reference["eval"]["computed"] == 0, reference
    one = train(load_cfg(tiny_model_dir, tmp_path / "one", *common)).run_dir
    assert_same_run(one, two, "checkpoints/step-3/model.safetensors")
