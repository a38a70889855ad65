"""Same config, same numbers: a run's metrics depend on its config only, never on what the model cache held
before or on what ran earlier in the process."""

import pytest
import torch

from dpokit.loop import train
from helpers import load_cfg

TIMING = {"tokens_per_s", "step_time_s"}


def strip(records):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


@pytest.mark.slow
def test_cold_and_warm_model_cache_give_the_same_run(tmp_path, monkeypatch):
    # the `tiny-random` alias is built into the model cache on first use; that must not move any RNG
    monkeypatch.setenv("DPOKIT_CACHE", str(tmp_path / "cache"))
    extra = ("lora.dropout=0.1", "train.max_steps=4", "data.limit=40")
    cold = train(load_cfg("tiny-random", tmp_path / "cold", *extra))
    torch.manual_seed(1234)  # whatever ran before in this process must not matter either
    warm = train(load_cfg("tiny-random", tmp_path / "warm", *extra))
    assert strip(cold.history) == strip(warm.history)


def test_model_building_leaves_the_global_rng_alone(tmp_path, monkeypatch):
    from dpokit.models import TINY_ALIAS, resolve_model_path

    monkeypatch.setenv("DPOKIT_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(7)
    before = torch.get_rng_state()
    resolve_model_path(TINY_ALIAS)
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.slow
def test_gguf_conversion_leaves_the_rng_alone_and_dithers_bf16_ties(tmp_path):
    """The embedded model's Q4_1 weights put 8.1% of the converted fp32 values exactly halfway between two
    bf16 values (random values: ~0.002%); the conversion moves them inside their bf16 interval,
    deterministically (benchmarks/bf16_ties.py measures what that does to bf16 training)."""
    from safetensors.torch import load_file

    from dpokit.models import bf16_grid_shares, convert_gguf, smollm2_gguf_path

    torch.manual_seed(3)
    before = torch.get_rng_state()
    convert_gguf(smollm2_gguf_path(), tmp_path / "a")
    assert torch.equal(torch.get_rng_state(), before)
    weights = load_file(str(tmp_path / "a" / "model.safetensors"))
    assert bf16_grid_shares(weights.values())[1] < 1e-4
