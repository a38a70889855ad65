"""Sampling, sampled KL and `dpokit eval`: log-probs of samples against an independent forward, the KL
estimator against the exact KL, and evaluation of a saved run reproducing the run's own final metrics."""

import json
import math

import pytest
import torch

from dpokit.cli import main
from dpokit.data import DataError
from dpokit.data.prompts import load_prompts
from dpokit.evaluation import generation_metrics, preference_metrics
from dpokit.generate import SamplingSettings, eos_ids, sample, sequence_logps
from dpokit.logps import CompletionLogps
from dpokit.loop import train
from dpokit.models import add_lora, load_model
from dpokit.reference import Reference
from dpokit.rewards import get_reward
from dpokit.trained import Trained, load_trained
from helpers import copy_run, load_cfg


@pytest.fixture(scope="module")
def tiny(tiny_model_dir, tiny_tokenizer):
    return load_model(str(tiny_model_dir)).eval(), tiny_tokenizer


def test_samples_are_deterministic_and_end_at_eos(tiny):
    model, tok = tiny
    prompts = (
        ["hello there", "a b c d e f g", [{"role": "user", "content": "hi"}]]
        if tok.chat_template
        else ["hello", "a b c d"]
    )
    settings = SamplingSettings(max_new_tokens=10, batch_size=4, seed=3)
    first = sample(model, tok, prompts, 3, settings, progress=False)
    again = sample(model, tok, prompts, 3, settings, progress=False)
    assert [[s.completion_ids for s in row] for row in first] == [
        [s.completion_ids for s in row] for row in again
    ]
    stop = eos_ids(model, tok)
    for row in first:
        assert len(row) == 3
        for s in row:
            assert 1 <= len(s.completion_ids) <= 10
            assert s.finished == (s.completion_ids[-1] in stop)
            assert not any(t in stop for t in s.completion_ids[:-1])
    other = sample(
        model, tok, prompts, 3, SamplingSettings(max_new_tokens=10, batch_size=4, seed=4), progress=False
    )
    assert [s.completion_ids for row in other for s in row] != [
        s.completion_ids for row in first for s in row
    ]


def test_greedy_samples_equal_transformers_generate(tiny):
    """The sampler's own decoding loop (one prefill shared by a prompt's samples, a preallocated cache,
    one-query attention, ended rows leaving the batch) against transformers' generate, token for token."""
    model, tok = tiny
    prompts = ["hello there", "a b c d e f g h i j", "x", "the quick brown fox jumps"]
    if tok.chat_template:
        prompts.append([{"role": "user", "content": "hi"}])
    ours = sample(model, tok, prompts, 3, SamplingSettings(max_new_tokens=12, batch_size=6, temperature=0))
    stop = eos_ids(model, tok)
    for prompt, row in zip(prompts, ours, strict=True):
        ids = torch.tensor([row[0].prompt_ids])
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=12,
                eos_token_id=stop,
                pad_token_id=tok.pad_token_id,
            )[0, ids.shape[1] :].tolist()
        end = next((t for t, x in enumerate(out) if x in stop), None)
        want = out if end is None else out[: end + 1]
        assert [s.completion_ids for s in row] == [want] * 3, prompt


def test_draws_follow_the_softmax_and_the_nucleus():
    from dpokit.generate import _draw

    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -30.0]]).repeat(20000, 1)
    gen = torch.Generator().manual_seed(0)
    counts = torch.bincount(_draw(logits, SamplingSettings(), gen), minlength=5).double()
    want = torch.softmax(logits[0].double(), -1) * 20000
    assert counts[4] == 0  # probability 3e-14
    assert ((counts - want).abs() < 4 * want.sqrt() + 1).all(), (counts, want)
    hot = torch.bincount(_draw(logits, SamplingSettings(temperature=2.0), gen), minlength=5).double()
    assert ((hot - torch.softmax(logits[0].double() / 2, -1) * 20000).abs() < 4 * hot.sqrt() + 1).all()
    # top_p=0.8: the nucleus is tokens 0 and 1 (0.644 + 0.237 reaches 0.8), renormalized
    nucleus = torch.bincount(_draw(logits, SamplingSettings(top_p=0.8), gen), minlength=5)
    assert nucleus[2:].sum() == 0 and abs(nucleus[0] / 20000 - 0.644 / 0.881) < 0.015
    assert (_draw(logits[:3], SamplingSettings(temperature=0), gen) == 0).all()


def test_eos_is_kept_in_ids_and_dropped_from_text(tiny):
    model, tok = tiny
    eos = eos_ids(model, tok)[0]

    def eos_first(module, inputs, logits):  # EOS becomes the certain next token: every sample is EOS alone
        logits[..., eos] += 1e4
        return logits

    hook = model.get_output_embeddings().register_forward_hook(eos_first)
    try:
        ended = sample(model, tok, ["x y z", "hello"], 4, SamplingSettings(max_new_tokens=5), progress=False)
    finally:
        hook.remove()
    for s in (s for row in ended for s in row):
        assert s.finished and s.completion_ids == [eos] and s.completion == ""


def test_sequence_logps_match_an_independent_forward(tiny):
    model, tok = tiny
    samples = sample(
        model,
        tok,
        ["hello there", "one two three four"],
        3,
        SamplingSettings(max_new_tokens=8),
        progress=False,
    )
    got = sequence_logps(model, samples, tok.pad_token_id, batch_size=1)
    for i, row in enumerate(samples):
        for k, s in enumerate(row):
            ids = torch.tensor([s.prompt_ids + s.completion_ids])
            with torch.no_grad():
                logp = model(ids).logits[0].log_softmax(-1)
            p = len(s.prompt_ids)
            want = sum(float(logp[p - 1 + t, c]) for t, c in enumerate(s.completion_ids))
            assert got[i, k].item() == pytest.approx(want, abs=1e-4)


def test_sampled_kl_estimates_the_exact_kl(tiny_model_dir, tiny_tokenizer):
    """One-token completions: the exact KL(pi || pi_ref) is a sum over the vocabulary; the estimate from
    800 samples must lie within 4 standard errors of it (deterministic: fixed seeds). The policy is the
    reference with its output layer scaled (sharper next-token distributions); a separate model."""
    reference = load_model(str(tiny_model_dir)).eval()
    model = load_model(str(tiny_model_dir)).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(40.0)
    pr = Trained(model, tiny_tokenizer, Reference.separate(reference))
    prompt = "the quick brown fox"
    metrics, records = generation_metrics(
        pr,
        [prompt],
        get_reward("length"),
        800,
        SamplingSettings(max_new_tokens=1, batch_size=200),
        progress=False,
    )
    ids = torch.tensor([tiny_tokenizer(prompt)["input_ids"]])
    with torch.no_grad():
        logp = model(ids).logits[0, -1].log_softmax(-1)
        logq = reference(ids).logits[0, -1].log_softmax(-1)
    exact = float((logp.exp() * (logp - logq)).sum())
    assert exact > 0.1  # the perturbation is large enough to measure
    assert abs(metrics["kl/sequence"] - exact) < 4 * metrics["kl/sequence_stderr"]
    assert metrics["kl/token"] == pytest.approx(metrics["kl/sequence"])  # one token per completion
    assert len(records) == 1 and len(records[0]["policy"]) == 800


def test_identical_policy_and_reference_give_zero_kl_and_even_win_rate(tiny_model_dir, tiny_tokenizer):
    model = add_lora(
        load_model(str(tiny_model_dir)), r=4, alpha=8, dropout=0.0, target_modules=["q_proj"]
    ).eval()
    pr = Trained(model, tiny_tokenizer, Reference.adapters_off(CompletionLogps(model)))
    m, _ = generation_metrics(
        pr, ["a b", "c d e"], get_reward("length"), 4, SamplingSettings(max_new_tokens=6), progress=False
    )
    # LoRA B starts at zero: the same model, and the same seeds give the same samples
    assert (
        m["kl/sequence"] == 0.0
        and m["win_rate"] == 0.5
        and m["reward/gain"] == 0.0
        and m["length/drift"] == 0.0
    )


def _eval_pairs_file(tmp_path):
    from dpokit.data import load_examples

    examples, _ = load_examples("builtin:demo")
    path = tmp_path / "heldout.jsonl"
    path.write_text(
        "".join(
            json.dumps({"prompt": e.prompt, "chosen": e.chosen, "rejected": e.rejected}) + "\n"
            for e in examples[-12:]
        )
    )
    return path


@pytest.mark.slow
@pytest.mark.parametrize("lora", [True, False])
def test_eval_of_a_saved_run_reproduces_its_final_metrics(tmp_path, tiny_model_dir, lora):
    heldout = _eval_pairs_file(tmp_path)
    cfg = load_cfg(
        tiny_model_dir,
        tmp_path / "run",
        "data.limit=0",
        "data.eval_fraction=0",
        f"data.eval={heldout}",
        "data.max_length=128",
        "data.max_prompt_length=64",
        "train.save_final=true",
        "train.max_steps=4",
        "eval.batch_size=4",
        f"lora.enabled={str(lora).lower()}",
        "train.lr=5e-3" if lora else "train.lr=1e-4",
    )
    result = train(cfg)
    pr = load_trained(str(result.run_dir), reference=True)
    assert (
        pr.reference.disable_adapters == lora
    )  # LoRA: the policy with adapters off; full: the starting model
    got = preference_metrics(pr, str(heldout), max_length=128, max_prompt_length=64, batch_size=5)
    for key in (
        "loss",
        "rewards/accuracies",
        "rewards/margins",
        "rewards/chosen",
        "logratio/chosen",
        "drift/kl_chosen_per_token",
    ):
        assert got[key] == pytest.approx(result.final_eval[f"eval/{key}"], abs=1e-4), key
    assert abs(got["rewards/margins"]) > 1e-4  # the run moved the policy
    assert got["logratio/chosen"] * cfg.loss.beta == pytest.approx(got["rewards/chosen"], abs=1e-5)


@pytest.mark.slow
def test_cli_eval_writes_results_and_samples(tmp_path, tiny_lora_run, tiny_model_dir, capsys):
    heldout = _eval_pairs_file(tmp_path)
    run = copy_run(tiny_lora_run, tmp_path / "run")
    rc = main(
        [
            "eval",
            str(run),
            "--data",
            str(heldout),
            "--reward",
            "length:words",
            "--num-prompts",
            "5",
            "--samples",
            "2",
            "--max-new-tokens",
            "6",
            "--max-length",
            "128",
            "--max-prompt-length",
            "64",
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "win rate over the reference" in printed and f"{run} (step-3) against" in printed  # a table
    results = json.loads((run / "eval.json").read_text())
    assert results["preference"]["pairs"] == 12
    gen = results["generation"]
    assert gen["prompts"] == 5 and gen["samples_per_prompt"] == 2
    assert 0 <= gen["win_rate"] <= 1 and math.isfinite(gen["kl/sequence"])
    rows = [json.loads(x) for x in (run / "eval_samples.jsonl").read_text().splitlines()]
    assert len(rows) == 5 and all(len(r["policy"]) == 2 and len(r["reward_reference"]) == 2 for r in rows)
    capsys.readouterr()
    assert main(["eval", str(tiny_model_dir), "--reward", "length", "--prompts", "builtin:reviews"]) == 2
    assert "--ref" in capsys.readouterr().err
    assert main(["eval", str(run), "--reward", "nonsense", "--data", str(heldout)]) == 2
    assert "unknown reward" in capsys.readouterr().err
    assert main(["eval", str(run), "--reward", "length", "--prompts", str(heldout), "--top-p", "0"]) == 2
    assert "top_p=0.0 in (0, 1]" in capsys.readouterr().err
    # a model against an explicit reference (here itself: every log-ratio and the KL are exactly 0)
    out = tmp_path / "model-eval"
    assert (
        main(
            [
                "eval",
                str(tiny_model_dir),
                "--ref",
                str(tiny_model_dir),
                "--data",
                str(heldout),
                "--reward",
                "length",
                "--num-prompts",
                "3",
                "--max-new-tokens",
                "4",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    same = json.loads((out / "eval.json").read_text())
    assert same["preference"]["rewards/margins"] == 0.0 and same["preference"]["loss"] == pytest.approx(
        math.log(2)
    )
    assert same["generation"]["kl/sequence"] == 0.0 and same["generation"]["win_rate"] == 0.5


def test_prompts_builtin_splits_are_disjoint_and_bad_files_name_the_line(tmp_path):
    train_p = load_prompts("builtin:reviews", "train")
    eval_p = load_prompts("builtin:reviews", "eval")
    assert len(train_p) == 640 and len(eval_p) == 192 and not set(train_p) & set(eval_p)
    assert load_prompts("builtin:reviews", "eval", limit=5) == eval_p[:5]
    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    with pytest.raises(DataError, match=r"prompts.jsonl:line 2: prompt: missing"):
        load_prompts(str(bad))


@pytest.mark.slow
def test_an_unfinished_run_is_measured_at_its_newest_checkpoint_and_says_so(tmp_path, tiny_lora_run, caplog):
    """A run killed before its end has no final checkpoint: eval uses its newest step, says which on the
    console, and records it in eval.json."""
    from dpokit.rundir import Run

    run = Run(copy_run(tiny_lora_run, tmp_path / "run"))
    (run.path / "summary.json").unlink()  # as a run killed after step 3's checkpoint leaves it
    heldout = _eval_pairs_file(tmp_path)
    with caplog.at_level("WARNING"):
        assert main(["eval", str(run.path), "--data", str(heldout), "--max-length", "128"]) == 0
    assert "the run has no final checkpoint (it did not finish): using its newest one, step-3" in caplog.text
    results = run.eval_results
    assert results["step"] == 3 and results["checkpoint"].endswith("step-3")
    assert results["target"] == f"{run.path} (step-3)"


def test_length_controlled_gain_takes_out_what_length_buys():
    from dpokit.evaluation import length_controlled

    # reward = 2 x tokens + 1 exactly: all of the gain is length
    len_pol, len_ref = torch.tensor([[10.0, 12.0]]), torch.tensor([[4.0, 6.0]])
    lc = length_controlled(2 * len_pol + 1, 2 * len_ref + 1, len_pol, len_ref)
    assert lc["reward/length_slope"] == pytest.approx(2.0) and lc[
        "reward/gain_length_controlled"
    ] == pytest.approx(0.0)
    # a bonus of 3 at the same mean length: the controlled gain is the bonus, the slope still 2
    len_pol, len_ref = torch.tensor([[4.0, 12.0]]), torch.tensor([[6.0, 10.0]])
    lc = length_controlled(2 * len_pol + 4, 2 * len_ref + 1, len_pol, len_ref)
    assert lc["reward/gain_length_controlled"] == pytest.approx(3.0)
