"""What every test file (and the benchmarks) share: where the shared data lives and one config factory for
short runs on the tiny model. Each test states only what it changes."""

from __future__ import annotations

from pathlib import Path

from dpokit.config import Config, load_config

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
