"""`make demo`: DPO with LoRA on the embedded SmolLM2-135M-Instruct over the shipped demo pairs.

The pairs prefer a concise, correct answer over a verbose and/or wrong one; the summary compares the
held-out preference accuracy and reward margins before and after training.
"""

from __future__ import annotations

from dpokit.config import load_config
from dpokit.train import RunResult, train

DEMO_SETTINGS = [
    "model.name=smollm2-135m-instruct",
    "data.train=builtin:demo",
    "data.eval_fraction=0.15",
    "data.max_length=128",
    "data.max_prompt_length=64",
    "lora.enabled=true",
    "lora.r=8",
    "lora.alpha=16",
    "lora.target_modules=[q_proj,k_proj,v_proj,o_proj]",
    "loss.type=sigmoid",
    "loss.beta=0.1",
    "train.batch_size=4",
    "train.grad_accum=1",
    "train.max_steps=60",
    "train.lr=5.0e-4",
    "train.warmup_steps=6",
    "train.scheduler=cosine",
    "train.bf16=true",
    "eval.every=20",
    "eval.batch_size=16",
]


def run_demo(overrides: list[str] | None = None) -> RunResult:
    cfg = load_config(None, DEMO_SETTINGS + list(overrides or []))
    return train(cfg)


def summary_lines(result: RunResult) -> list[str]:
    before, after = result.initial_eval or {}, result.final_eval or {}
    rows = [
        ("eval/rewards/accuracies", "held-out accuracy"),
        ("eval/rewards/margins", "held-out margin"),
        ("eval/rewards/chosen", "held-out reward chosen"),
        ("eval/rewards/rejected", "held-out reward rejected"),
        ("eval/loss", "held-out loss"),
    ]
    lines = [f"{'':28}{'before':>10}{'after':>10}"]
    for key, label in rows:
        lines.append(f"{label:28}{before.get(key, float('nan')):>10.4f}{after.get(key, float('nan')):>10.4f}")
    lines.append(f"run dir: {result.run_dir}   checkpoint: {result.checkpoint}")
    return lines
