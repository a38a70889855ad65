"""End to end on a tiny random model: ln 2 at step 1, only adapters train, loss falls, batch x accumulation
invariance, and checkpoints that load back with transformers/PEFT."""

import json
import math

import pytest
import torch
import yaml

from dpokit.batching import Layout
from dpokit.files import read_jsonl as read_metrics
from dpokit.logps import CompletionLogps, sum_by_sequence
from dpokit.loop import train
from dpokit.metrics import PAIR_KEYS
from dpokit.models import load_model, load_tokenizer
from dpokit.tokenize import tokenize_pairs
from helpers import load_cfg

REQUIRED = ("step", "epoch", *PAIR_KEYS, "lr", "grad_norm", "tokens_per_s")


def tiny_cfg(tmp_path, model_dir, *overrides):
    return load_cfg(
        model_dir,
        tmp_path / "run",
        "data.limit=0",
        "data.eval_fraction=0.1",
        "data.max_length=192",
        "data.max_prompt_length=96",
        "train.save_final=true",
        "eval.batch_size=32",
        *overrides,
    )


@pytest.mark.slow
def test_step_one_ln2_metrics_and_run_dir(tmp_path, tiny_model_dir):
    result = train(tiny_cfg(tmp_path, tiny_model_dir, "data.limit=40", "train.grad_accum=2", "eval.every=2"))
    first = result.history[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["rewards/chosen"] == 0 and first["rewards/rejected"] == 0 and first["rewards/margins"] == 0
    records = read_metrics(result.run_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == [0, 1, 2, 3]  # step 0 = eval before training
    assert records[0]["eval/loss"] == pytest.approx(math.log(2), abs=1e-6)
    for r in records[1:]:
        assert all(k in r and math.isfinite(r[k]) for k in REQUIRED), r
    assert "eval/rewards/margins" in records[2] and "eval/rewards/margins" not in records[1]
    assert "eval/loss" in records[3]  # the last step always evaluates
    saved = yaml.safe_load((result.run_dir / "config.yaml").read_text())
    assert saved["train"]["grad_accum"] == 2 and saved["model"]["name"] == str(tiny_model_dir)
    stats = json.loads((result.run_dir / "data_stats.json").read_text())
    assert stats["train_file"]["valid"] >= 200
    assert (result.run_dir / "checkpoints" / "step-3" / "adapter_config.json").exists()


@pytest.mark.slow
def test_lora_changes_only_adapter_weights(tmp_path, tiny_model_dir):
    before = load_model(str(tiny_model_dir)).state_dict()
    result = train(tiny_cfg(tmp_path, tiny_model_dir, "data.limit=24"))
    after = {
        k.replace("base_model.model.", "").replace(".base_layer", ""): v
        for k, v in result.model.state_dict().items()
    }
    lora = {k: v for k, v in after.items() if "lora_" in k}
    assert lora and any(k.endswith("lora_B.default.weight") and v.abs().sum() > 0 for k, v in lora.items())
    for name, value in before.items():
        assert torch.equal(after[name], value), name


@pytest.mark.slow
def test_full_finetune_updates_weights_against_frozen_reference(tmp_path, tiny_model_dir):
    before = load_model(str(tiny_model_dir)).state_dict()
    result = train(tiny_cfg(tmp_path, tiny_model_dir, "lora.enabled=false", "train.lr=1e-4", "data.limit=24"))
    assert result.history[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert result.history[-1]["rewards/margins"] != 0  # the reference stayed behind
    changed = [k for k, v in result.model.state_dict().items() if not torch.equal(v, before[k])]
    assert len(changed) > len(before) // 2
    ckpt = result.checkpoint
    reloaded = load_model(str(ckpt))
    assert all(torch.equal(reloaded.state_dict()[k], v) for k, v in result.model.state_dict().items())


@pytest.mark.slow
def test_loss_falls_on_learnable_pairs(tmp_path, tiny_model_dir):
    result = train(
        tiny_cfg(tmp_path, tiny_model_dir, "train.max_steps=20", "train.batch_size=8", "data.limit=200")
    )
    assert result.final_eval["eval/loss"] < result.initial_eval["eval/loss"] - 0.1
    assert result.final_eval["eval/rewards/margins"] > 0.2
    assert result.final_eval["eval/rewards/accuracies"] > 0.7


@pytest.mark.slow
def test_batch4_accum1_equals_batch1_accum4(tmp_path, tiny_model_dir):
    common = (
        "data.limit=40",
        "train.max_steps=3",
        "train.save_final=false",
        "eval.at_start=false",
        "data.eval_fraction=0",
    )
    a = train(tiny_cfg(tmp_path / "a", tiny_model_dir, "train.batch_size=4", "train.grad_accum=1", *common))
    b = train(tiny_cfg(tmp_path / "b", tiny_model_dir, "train.batch_size=1", "train.grad_accum=4", *common))
    for ra, rb in zip(a.history, b.history, strict=True):
        for key in ("loss", "grad_norm", "rewards/margins", "rewards/accuracies", "logps/chosen"):
            assert ra[key] == pytest.approx(rb[key], rel=1e-5, abs=1e-7), (ra["step"], key)
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert all(torch.allclose(sa[k], sb[k], atol=1e-6) for k in sa)


@pytest.mark.slow
def test_lora_checkpoint_reloads_with_peft_and_same_logps(tmp_path, tiny_model_dir):
    from peft import PeftModel

    result = train(tiny_cfg(tmp_path, tiny_model_dir, "data.limit=24"))
    tokenizer = load_tokenizer(str(result.checkpoint))
    pairs, _ = tokenize_pairs(
        __import__("dpokit.data", fromlist=["load_examples"]).load_examples("builtin:demo")[0][:6],
        tokenizer,
        192,
        96,
    )
    batch = Layout().pairs(pairs, tokenizer.pad_token_id)
    reloaded = PeftModel.from_pretrained(load_model(str(tiny_model_dir)), str(result.checkpoint))

    def seq_logps(model):
        with torch.no_grad():
            tok = CompletionLogps(model.eval())(*batch.model_args)
        return sum_by_sequence(tok, batch.seq_index, batch.num_seqs)

    trained, loaded = seq_logps(result.model), seq_logps(reloaded)
    assert torch.allclose(trained, loaded, atol=1e-5)
    with reloaded.disable_adapter():
        base = seq_logps(reloaded)
    assert not torch.allclose(trained, base, atol=1e-4)  # the adapter does something


def test_run_dir_is_not_overwritten(tmp_path, tiny_model_dir):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("{}\n")
    from dpokit.errors import TrainingError

    with pytest.raises(TrainingError, match="train.overwrite=true"):
        train(tiny_cfg(tmp_path, tiny_model_dir))
