"""Interpolation toward the starting model (WARP's LITI): lambda 0 gives the starting model's log-probs
exactly and lambda 1 the run's, for LoRA and full fine-tuning; between them the weights are the straight
line; `dpokit eval --lambda` measures each point against the same reference samples, and `dpokit export
--lambda` ships one."""

from __future__ import annotations

import json

import pytest
import torch

from dpokit import evaluate, export, load
from dpokit.cli import main
from dpokit.errors import UsageError
from dpokit.interpolation import between
from dpokit.loop import train
from dpokit.models import load_model
from helpers import copy_run, load_cfg


def logps(model, tokenizer) -> torch.Tensor:
    """Log-probs of every next token of a few held-out texts, fp32."""
    texts = ["The movie was", "I did not expect the ending to", "Plot: a dog learns to fly."]
    with torch.no_grad():
        out = []
        for text in texts:
            ids = torch.tensor([tokenizer(text)["input_ids"]])
            out.append(torch.log_softmax(model(ids).logits[0, :-1].float(), -1).gather(1, ids[0, 1:, None]))
        return torch.cat(out).flatten()


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def lora_run(tiny_lora_run, tmp_path_factory):
    return copy_run(tiny_lora_run, tmp_path_factory.mktemp("liti") / "run")


def test_lora_lambda_0_is_the_base_and_1_the_run_exactly(lora_run, tiny_model_dir):
    trained = load(lora_run)
    tok = trained.tokenizer
    as_trained = logps(trained.model, tok)
    start = logps(load_model(str(tiny_model_dir)).eval(), tok)
    assert not torch.equal(as_trained, start)  # the adapter moved the log-probs
    assert torch.equal(logps(trained.interpolate(0.0).model, tok), start)
    assert torch.equal(logps(trained.interpolate(1.0).model, tok), as_trained)
    half = logps(trained.interpolate(0.5).model, tok)
    assert not torch.equal(half, start) and not torch.equal(half, as_trained)
    # the weights of lambda 0.5 lie halfway on the straight line from the base to the merged run
    merged_half = weights(load(lora_run).interpolate(0.5).merged())
    merged_end = weights(load(lora_run).merged())
    base = weights(load_model(str(tiny_model_dir)))
    for name, w in merged_half.items():
        assert torch.allclose(w, base[name] + 0.5 * (merged_end[name] - base[name]), atol=1e-6), name


@pytest.mark.slow
def test_full_finetuning_lambda_0_is_the_start_and_1_the_run_exactly(tiny_model_dir, tmp_path):
    train(
        load_cfg(
            tiny_model_dir, tmp_path / "full", "lora.enabled=false", "train.lr=1e-3", "train.save_final=true"
        )
    )
    trained = load(tmp_path / "full")
    tok = trained.tokenizer
    as_trained, trained_weights = logps(trained.model, tok), weights(trained.model)
    start_model = load_model(str(tiny_model_dir)).eval()
    start = logps(start_model, tok)
    assert not torch.equal(as_trained, start)
    assert torch.equal(logps(trained.interpolate(0.0).model, tok), start)
    for name, w in weights(start_model).items():
        assert torch.equal(trained.model.state_dict()[name], w), name
    trained.interpolate(0.25)
    halfway = between(weights(start_model), trained_weights, 0.25)
    for name, w in trained.model.state_dict().items():
        assert torch.allclose(w, halfway[name], atol=1e-7), name
    assert torch.equal(logps(trained.interpolate(1.0).model, tok), as_trained)


@pytest.mark.slow
def test_eval_at_several_lambdas_shares_the_reference_samples(lora_run, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Review {i}: the film"}) + "\n" for i in range(4)))
    common = dict(prompts=str(prompts), reward="length", num_prompts=4, samples=2, max_new_tokens=8)
    curve = evaluate(lora_run, lambdas=[0, 1], out=tmp_path / "curve", **common)
    start, end = (p["generation"] for p in curve.interpolation)
    assert [p["lambda"] for p in curve.interpolation] == [0.0, 1.0]
    # lambda 0 is the reference itself: the same draws give the same completions, and no KL at all
    zero = [r for r in curve.samples if r["lambda"] == 0.0]
    assert all(r["policy"] == r["reference"] for r in zero)
    assert start["kl/sequence"] == 0.0 and start["reward/gain"] == 0.0 and start["win_rate"] == 0.5
    # lambda 1 is the run as `evaluate` measures it without lambdas
    plain = evaluate(lora_run, out=tmp_path / "plain", **common).generation
    for key in ("reward/policy", "reward/reference", "kl/sequence", "win_rate", "length/policy"):
        assert end[key] == pytest.approx(plain[key], abs=1e-6), key
    args = ["eval", str(lora_run), "--prompts", str(prompts), "--reward", "length", "--num-prompts", "4"]
    assert main([*args, "--max-new-tokens", "8", "--lambda", "0,0.5,1", "--out", str(tmp_path / "c")]) == 0
    table = capsys.readouterr().out
    assert "between the start (lambda 0) and as trained (1)" in table and "0.5" in table
    assert len(json.loads((tmp_path / "c" / "eval.json").read_text())["interpolation"]) == 3


def test_export_ships_a_chosen_lambda(lora_run, tiny_model_dir, tmp_path):
    assert main(["export", str(lora_run), "--out", str(tmp_path / "zero"), "--lambda", "0"]) == 0
    base = weights(load_model(str(tiny_model_dir)))
    exported = weights(load_model(str(tmp_path / "zero")))
    assert all(torch.equal(exported[k], w) for k, w in base.items())
    card = (tmp_path / "zero" / "README.md").read_text()
    assert "interpolated to lambda=0" in card
    done = export(lora_run, tmp_path / "half", lam=0.5)
    merged_end = weights(load(lora_run).merged())
    half = weights(load_model(str(done.folder)))
    assert all(torch.allclose(half[k], base[k] + 0.5 * (merged_end[k] - base[k]), atol=1e-6) for k in base)


def test_lambda_mistakes_are_one_line(lora_run, tiny_model_dir, tmp_path, capsys):
    with pytest.raises(UsageError, match="each must be 0 or more"):
        evaluate(lora_run, prompts=["a"], reward="length", lambdas="-1")
    with pytest.raises(UsageError, match="give numbers"):
        evaluate(lora_run, prompts=["a"], reward="length", lambdas="half")
    with pytest.raises(UsageError, match="outside a run"):
        load(str(tiny_model_dir)).interpolate(0.5)
    assert main(["export", str(lora_run), "--out", str(tmp_path / "x"), "--lambda", "-0.5"]) == 2
    assert "0 or more" in capsys.readouterr().err
