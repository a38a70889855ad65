"""Invariance: padded == prefix-shared == packed == packed + prefix-shared, for log-probs, gradients and
the loss trajectory of a short run (fp32)."""

import random

import pytest
import torch

from dpokit.batching import Layout
from dpokit.config import load_config
from dpokit.logps import CompletionLogps, sum_by_sequence
from dpokit.models import load_model
from dpokit.tokenize import TokenizedPair
from dpokit.train import train

LAYOUTS = {
    "padded": Layout(),
    "prefix_shared": Layout(prefix_share=True),
    "packed": Layout(pack=True, pack_tokens=64),
    "packed_prefix_shared": Layout(prefix_share=True, pack=True, pack_tokens=64),
}


def random_pairs(n: int, seed: int = 0) -> list[TokenizedPair]:
    rng = random.Random(seed)
    ids = lambda k: [rng.randrange(3, 250) for _ in range(k)]  # noqa: E731
    return [TokenizedPair(ids(rng.randint(1, 12)), ids(rng.randint(1, 9)), ids(rng.randint(1, 9))) for _ in range(n)]


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    torch.manual_seed(0)
    return load_model(str(tiny_model_dir)).eval()


def seq_logps_and_grads(model, batch):
    model.zero_grad()
    tok = CompletionLogps(model)(batch.input_ids, batch.position_ids, batch.attention_mask, batch.pred_index, batch.target_ids)
    seq = sum_by_sequence(tok, batch.seq_index, batch.num_seqs)
    (seq * torch.linspace(0.5, 1.5, seq.numel())).sum().backward()
    return seq.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_all_layouts_give_the_same_logps_and_gradients(model):
    pairs = random_pairs(7)
    base_logps, base_grads = seq_logps_and_grads(model, LAYOUTS["padded"].pairs(pairs, pad_id=0))
    for name, layout in LAYOUTS.items():
        batch = layout.pairs(pairs, pad_id=0)
        logps, grads = seq_logps_and_grads(model, batch)
        assert torch.allclose(logps, base_logps, atol=1e-4, rtol=0), name
        for key, g in grads.items():
            assert torch.allclose(g, base_grads[key], atol=1e-4, rtol=1e-4), (name, key)


def test_packing_removes_padding_and_prefix_sharing_the_second_prompt():
    pairs = random_pairs(16, seed=1)
    tokens = {name: layout.pairs(pairs, 0) for name, layout in LAYOUTS.items()}
    real = sum(len(p.prompt_ids) * 2 + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
    assert tokens["padded"].num_tokens == real
    assert tokens["prefix_shared"].num_tokens == real - sum(len(p.prompt_ids) for p in pairs)
    assert tokens["packed"].input_ids.numel() < tokens["padded"].input_ids.numel()
    assert tokens["packed_prefix_shared"].num_tokens == tokens["prefix_shared"].num_tokens


def test_training_trajectory_is_the_same_in_every_layout(tmp_path, tiny_model_dir):
    histories = {}
    for name, flags in {
        "padded": [],
        "prefix_shared": ["train.prefix_sharing=true"],
        "packed": ["train.packing=true", "train.pack_tokens=400"],
        "packed_prefix_shared": ["train.packing=true", "train.prefix_sharing=true", "train.pack_tokens=400"],
    }.items():
        cfg = load_config(
            None,
            [
                f"model.name={tiny_model_dir}",
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
                f"train.run_dir={tmp_path / name}",
                *flags,
            ],
        )
        histories[name] = train(cfg).history
    for name, history in histories.items():
        for a, b in zip(histories["padded"], history, strict=True):
            for key in ("loss", "grad_norm", "rewards/margins", "logps/chosen", "eval/loss"):
                if key in a:
                    assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), (name, a["step"], key)
