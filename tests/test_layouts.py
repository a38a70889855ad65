"""Invariance: padded == prefix-shared == packed == packed + prefix-shared, each with block attention and
with the dense reference masks, for log-probs, gradients and the loss trajectory of a short run (fp32);
and one prompt with N branches equals N separate sequences.

On the CPU by default; DPOKIT_TEST_DEVICE=cuda runs the model and the training runs on the GPU
(benchmarks/gpu_check.sh)."""

import random

import pytest
import torch

from dpokit.batching import Layout
from dpokit.logps import CompletionLogps
from dpokit.loop import train
from dpokit.models import load_model
from dpokit.tokenize import TokenizedPair
from helpers import TEST_DEVICE, load_cfg, run_overrides

LAYOUTS = {
    "padded": Layout(),
    "prefix_shared": Layout(prefix_share=True),
    "packed": Layout(pack=True, pack_tokens=64),
    "packed_prefix_shared": Layout(prefix_share=True, pack=True, pack_tokens=64),
    "prefix_shared_blocks": Layout(prefix_share=True, attention="blocks"),
    "packed_blocks": Layout(pack=True, pack_tokens=64, attention="blocks"),
    "packed_prefix_shared_blocks": Layout(prefix_share=True, pack=True, pack_tokens=64, attention="blocks"),
    "one_row_blocks": Layout(prefix_share=True, pack=True, pack_tokens=10**6, attention="blocks"),
}


def random_pairs(n: int, seed: int = 0) -> list[TokenizedPair]:
    rng = random.Random(seed)
    ids = lambda k: [rng.randrange(3, 250) for _ in range(k)]  # noqa: E731
    return [
        TokenizedPair(ids(rng.randint(1, 12)), ids(rng.randint(1, 9)), ids(rng.randint(1, 9)))
        for _ in range(n)
    ]


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    from dpokit.attention import enable_blocks

    model = load_model(str(tiny_model_dir)).eval().to(TEST_DEVICE)
    assert enable_blocks(model)  # block batches run per document; every other call is plain sdpa
    return model


def seq_logps_and_grads(model, batch):
    model.zero_grad()
    batch = batch.to(TEST_DEVICE)
    tok = CompletionLogps(model)(*batch.model_args)
    seq = batch.sequence_sums(tok)
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
    assert (
        tokens["one_row_blocks"].input_ids.numel() == tokens["prefix_shared"].num_tokens
    )  # no padding at all


def test_one_prompt_with_n_branches_equals_n_separate_sequences(model):
    """The tree of the on-policy rounds: a prompt and 3 sampled completions in one document (blocks and
    dense), packed with a second document, against each completion in a row of its own."""
    from dpokit.batching import Doc, build_batch

    rng = random.Random(3)
    ids = lambda k: [rng.randrange(3, 250) for _ in range(k)]  # noqa: E731
    docs = [Doc(ids(6), ((ids(4), 0), (ids(7), 1), (ids(2), 2))), Doc(ids(3), ((ids(5), 3), (ids(1), 4)))]
    single = [Doc(d.prompt, (branch,)) for d in docs for branch in d.completions]
    plain = build_batch(single, [[i] for i in range(len(single))], 0, [1.0] * 5, "padding")
    want, _ = seq_logps_and_grads(model, plain)
    for mask in ("blocks", "dense"):
        got, _ = seq_logps_and_grads(model, build_batch(docs, [[0, 1]], 0, [1.0, 1.0], mask))
        assert torch.allclose(got, want, atol=1e-5, rtol=0), mask


def sampled_pairs(rule: str, prompts: int = 3, k: int = 4, seed: int = 5) -> list[TokenizedPair]:
    """Pairs drawn as a round of `dpokit iterate` draws them: k samples per prompt (a repeated one among
    them), paired best against worst or every pair, with random scores."""
    from dpokit.pairing import pair_indices

    rng = random.Random(seed)
    ids = lambda n: [rng.randrange(3, 250) for _ in range(n)]  # noqa: E731
    pairs = []
    for _ in range(prompts):
        prompt = ids(rng.randint(4, 10))
        samples = [ids(rng.randint(1, 8)) for _ in range(k - 1)]
        samples.append(list(samples[0]))  # the same completion sampled twice
        scores = [rng.random() for _ in range(k)]
        found, _ = pair_indices(scores, rule, 0.0)
        pairs += [TokenizedPair(prompt, samples[i], samples[j]) for i, j in found]
    return pairs


@pytest.mark.parametrize("rule", ["best_worst", "all_pairs"])
def test_pairs_of_one_prompt_share_its_document_exactly(model, rule):
    """1 prompt + N branches: the prompt and each distinct completion computed once, the same log-probs
    and gradients as the padded layout (every pair in rows of its own)."""
    pairs = sampled_pairs(rule)
    want, want_grads = seq_logps_and_grads(model, Layout().pairs(pairs, pad_id=0))
    for name, layout in LAYOUTS.items():
        batch = layout.pairs(pairs, pad_id=0)
        # best against worst is one pair per prompt: the two-branch layout of before
        assert (batch.seq_map is not None) == (layout.prefix_share and rule == "all_pairs"), name
        got, grads = seq_logps_and_grads(model, batch)
        assert got.shape == (2 * len(pairs),)
        assert torch.allclose(got, want, atol=1e-4, rtol=0), name
        for key, g in grads.items():
            assert torch.allclose(g, want_grads[key], atol=1e-4, rtol=1e-4), (name, key)


def test_shared_branches_compute_each_prompt_and_distinct_completion_once():
    pairs = sampled_pairs("all_pairs", prompts=2, k=4)  # 6 pairs per prompt
    batch = Layout(prefix_share=True).pairs(pairs, pad_id=0)
    prompts = {tuple(p.prompt_ids): len(p.prompt_ids) for p in pairs}
    distinct = {(tuple(p.prompt_ids), tuple(c)) for p in pairs for c in (p.chosen_ids, p.rejected_ids)}
    assert len(pairs) == 12 and batch.num_pairs == 12
    assert batch.num_seqs == len(distinct) == 6  # 4 samples per prompt, one of them twice
    assert batch.num_tokens == sum(prompts.values()) + sum(len(c) for _, c in distinct)
    padded = Layout().pairs(pairs, pad_id=0).num_tokens
    assert batch.num_tokens < padded / 3
    lengths = batch.completion_lengths()
    assert lengths.tolist() == [len(p.chosen_ids) for p in pairs] + [len(p.rejected_ids) for p in pairs]
    # unique prompts: exactly the two-branch layout of before, no map
    assert Layout(prefix_share=True).pairs(random_pairs(5), pad_id=0).seq_map is None


def test_group_by_prompt_keeps_a_prompts_pairs_together_and_changes_nothing_for_unique_prompts():
    from dpokit.config import TrainConfig
    from dpokit.schedule import prompt_groups, step_schedule

    tc = TrainConfig(batch_size=6, epochs=2)
    unique = random_pairs(10)
    assert list(step_schedule(10, tc, groups=prompt_groups(unique))) == list(step_schedule(10, tc))
    pairs = sampled_pairs("all_pairs", prompts=4, k=4)  # 4 prompts x 6 pairs, in prompt order
    assert len(pairs) == 24

    def prompts_per_micro_batch(groups):
        return [
            len({tuple(pairs[i].prompt_ids) for i in micro})
            for step in step_schedule(24, tc, groups=groups)
            for micro in step
        ]

    assert prompts_per_micro_batch(prompt_groups(pairs)) == [1] * 8  # each micro-batch is one prompt's 6
    assert max(prompts_per_micro_batch(None)) > 1  # shuffled pairs mix prompts


@pytest.mark.slow
def test_training_trajectory_is_the_same_in_every_layout(tmp_path, tiny_model_dir):
    histories = {}
    dense = "train.attention=dense"
    for name, flags in {
        "padded": [],
        "prefix_shared": ["train.prefix_sharing=true"],
        "packed": ["train.packing=true", "train.pack_tokens=400"],
        "packed_prefix_shared": ["train.packing=true", "train.prefix_sharing=true", "train.pack_tokens=400"],
        "packed_prefix_shared_dense": ["train.packing=true", "train.prefix_sharing=true", dense],
        "prefix_shared_dense_checkpointed": [
            "train.prefix_sharing=true",
            dense,
            "train.gradient_checkpointing=true",
        ],
        "packed_blocks_checkpointed": ["train.packing=true", "train.gradient_checkpointing=true"],
    }.items():
        cfg = load_cfg(tiny_model_dir, tmp_path / name, *flags, f"train.device={TEST_DEVICE}")
        histories[name] = train(cfg).history
    for name, history in histories.items():
        for a, b in zip(histories["padded"], history, strict=True):
            for key in ("loss", "grad_norm", "rewards/margins", "logps/chosen", "eval/loss"):
                if key in a:
                    assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), (name, a["step"], key)


def small_cfg(tmp_path, model_dir, name, *flags):
    return load_cfg(model_dir, tmp_path / name, *flags, f"train.device={TEST_DEVICE}")


def assert_same_history(a, b, label):
    for ra, rb in zip(a, b, strict=True):
        for key in (
            "loss",
            "grad_norm",
            "rewards/margins",
            "rewards/chosen",
            "eval/loss",
            "eval/rewards/margins",
        ):
            if key in ra:
                assert rb[key] == pytest.approx(ra[key], rel=1e-4, abs=1e-5), (label, ra["step"], key)


@pytest.mark.slow
def test_bf16_autocast_starts_at_ln2_and_tracks_fp32(tmp_path, tiny_model_dir):
    fp32 = train(small_cfg(tmp_path, tiny_model_dir, "fp32")).history
    bf16 = train(small_cfg(tmp_path, tiny_model_dir, "bf16", "train.bf16=true")).history
    assert bf16[0]["loss"] == pytest.approx(
        0.6931471805599453, abs=1e-6
    )  # policy == reference, same precision
    for a, b in zip(fp32, bf16, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=0.05, abs=0.01)
        assert b["rewards/margins"] == pytest.approx(a["rewards/margins"], rel=0.2, abs=0.02)


@pytest.mark.slow
def test_fast_fp32_matmul_is_exact_or_refused(tmp_path, tiny_model_dir):
    from dpokit.backends import apply_matmul_backend
    from dpokit.errors import TrainingError

    plain = train(small_cfg(tmp_path, tiny_model_dir, "ieee")).history
    try:
        apply_matmul_backend(True)
    except TrainingError as err:  # a CPU that really computes this path in bf16 is refused, with the fix
        assert "train.fast_fp32_matmul=false" in str(err)
        return
    finally:
        apply_matmul_backend(False)
    fast = train(small_cfg(tmp_path, tiny_model_dir, "fast", "train.fast_fp32_matmul=true")).history
    assert_same_history(plain, fast, "fast_fp32_matmul")
    assert torch.backends.mkldnn.matmul.fp32_precision == "bf16"
    apply_matmul_backend(False)


@pytest.mark.slow
def test_policy_trains_in_train_mode_and_checkpointing_is_exact(tmp_path, tiny_model_dir, monkeypatch):
    modes = []
    real = CompletionLogps.forward

    def record(self, *args, **kwargs):
        if torch.is_grad_enabled():
            modes.append(self.model.training)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(CompletionLogps, "forward", record)
    plain = train(small_cfg(tmp_path, tiny_model_dir, "plain")).history
    assert modes and all(modes)  # from_pretrained returns eval mode; training must switch it
    checkpointed = train(
        small_cfg(tmp_path, tiny_model_dir, "gc", "train.gradient_checkpointing=true")
    ).history
    assert_same_history(plain, checkpointed, "gradient_checkpointing")


@pytest.mark.slow
def test_low_memory_allocator_changes_nothing_but_memory(tmp_path, tiny_model_dir):
    import subprocess
    import sys

    from dpokit.files import read_jsonl as read_metrics

    plain = train(small_cfg(tmp_path, tiny_model_dir, "plain")).history
    # a subprocess: the allocator setting is process-wide
    args = run_overrides(
        tiny_model_dir, tmp_path / "lowmem", "train.low_memory_allocator=true", f"train.device={TEST_DEVICE}"
    )
    subprocess.run([sys.executable, "-m", "dpokit.cli", "train", *args], check=True, capture_output=True)
    lowmem = [r for r in read_metrics(tmp_path / "lowmem" / "metrics.jsonl") if r["step"] > 0]
    assert_same_history(plain, lowmem, "low_memory_allocator")
