"""Data parallel through Accelerate on CPU (gloo): 2 processes x batch 2 == 1 process x batch 4."""

import pytest
import torch
from safetensors.torch import load_file

from dpokit.cli import main
from dpokit.config import load_config
from dpokit.metrics import read_metrics
from dpokit.train import train

KEYS = ("loss", "grad_norm", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
        "logps/chosen", "eval/loss", "eval/rewards/margins", "eval/rewards/accuracies")


@pytest.mark.parametrize(
    "lora, extra",
    [
        ("true", []),
        ("false", []),
        ("true", ["train.precompute_ref=true", "train.packing=true", "train.prefix_sharing=true"]),
        ("true", ["eval.batch_size=8"]),  # 8 eval pairs: process 1 gets no eval batch at all
    ],
    ids=["lora-adapter-ref", "full-frozen-copy", "lora-cached-ref-packed", "lora-one-process-without-eval-batch"],
)
def test_two_processes_match_one(tmp_path, tiny_model_dir, lora, extra):
    lr = "train.lr=1e-3" if lora == "true" else "train.lr=1e-4"
    common = [f"model.name={tiny_model_dir}", "data.train=builtin:demo", "data.limit=40", "data.eval_fraction=0.2",
              "lora.r=4", f"lora.enabled={lora}", "train.max_steps=3", lr, "train.device=cpu", "train.progress=false",
              "eval.batch_size=4", "eval.every=2", f"train.ref_cache_dir={tmp_path / 'cache'}", *extra]
    one = train(load_config(None, [*common, "train.batch_size=4", f"train.run_dir={tmp_path / 'one'}"]))
    two_dir = tmp_path / "two"
    assert main(["train", *common, "train.batch_size=2", f"train.run_dir={two_dir}", "--num-processes", "2"]) == 0
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
