"""The sentiment demo pipeline end to end on the tiny random model (the real one runs in `make demo`):
pairs labeled by the reward, a DPO run on them, generation metrics, the sweep's frontier and the report."""

import json

import pytest

from dpokit.data import load_examples
from dpokit.demo import DemoSettings, label_pairs, run_demo, summary_lines
from dpokit.generate import Sample
from dpokit.rundir import Run


def _s(text):
    return Sample("p", text, [1], [2], True)


def test_label_pairs_higher_wins_and_drops_ties():
    import random

    samples = [[_s("good"), _s("bad")], [_s("x"), _s("y")], [_s("same"), _s("same")], [_s("lo"), _s("hi")]]
    rewards = [[0.9, -0.2], [0.3, 0.3], [0.1, 0.5], [-0.5, 0.4]]
    pairs = label_pairs(["a", "b", "c", "d"], samples, rewards, "higher", 0.25, random.Random(0))
    assert [(p["prompt"], p["chosen"], p["rejected"]) for p in pairs] == [
        ("a", "good", "bad"),
        ("d", "hi", "lo"),
    ]
    assert pairs[0]["score_chosen"] == 0.9 and pairs[1]["score_rejected"] == -0.5
    # Bradley-Terry: with a tiny scale the larger reward wins almost surely; with a huge one it is a coin flip
    many = [[_s("a"), _s("b")]] * 400
    sharp = label_pairs(["p"] * 400, many, [[1.0, 0.0]] * 400, "bradley_terry", 0.01, random.Random(0))
    flat = label_pairs(["p"] * 400, many, [[1.0, 0.0]] * 400, "bradley_terry", 1000.0, random.Random(0))
    assert all(p["chosen"] == "a" for p in sharp)
    assert 150 < sum(p["chosen"] == "a" for p in flat) < 250


@pytest.mark.slow
def test_demo_pipeline_with_sweep(tmp_path, tiny_model_dir):
    ds = DemoSettings(
        train_prompts=12,
        eval_prompts=4,
        reward="length",
        max_new_tokens=8,
        sweep_betas=[0.5],
        best_of=[1, 2, 4],
    )
    out = tmp_path / "demo"
    result = run_demo(
        [f"model.name={tiny_model_dir}", "train.bf16=false", "train.progress=false", "train.epochs=1"],
        sweep=True,
        run_dir=str(out),
        settings=ds,
    )
    run = Run(out)
    pairs, _ = load_examples(str(run.data_file("train_pairs")))
    assert 0 < len(pairs) <= 12
    # reward=length: each pair's scores are its texts' lengths, and the longer one was chosen
    assert all(
        e.meta["score_chosen"] == len(e.chosen) > len(e.rejected) == e.meta["score_rejected"] for e in pairs
    )
    results = run.eval_results
    gen = results["generation"]
    assert gen["prompts"] == 4 and gen["samples_per_prompt"] == 2
    assert results["preference_before"]["loss"] == pytest.approx(0.6931, abs=1e-4)
    # the held-out figures are those of the samples it kept: rewards recomputed from their texts
    rows = run.eval_samples
    assert [r["reward_policy"] for r in rows] == [[float(len(t)) for t in r["policy"]] for r in rows]
    assert [r["reward_reference"] for r in rows] == [[float(len(t)) for t in r["reference"]] for r in rows]
    policy = [x for r in rows for x in r["reward_policy"]]
    assert gen["reward/policy"] == pytest.approx(sum(policy) / len(policy))
    kl = [x for r in rows for x in r["kl_sequence"]]
    assert gen["kl/sequence"] == pytest.approx(sum(kl) / len(kl))
    main_point = result.frontier[0]  # the main run's point is its held-out measure
    assert (main_point["reward"], main_point["kl"]) == (gen["reward/policy"], gen["kl/sequence"])
    methods = [(p["method"], p["label"].split(":")[0]) for p in result.frontier]
    assert methods == [
        ("DPO", "beta=0.1"),
        ("DPO", "beta=0.5"),
        ("Preferred-FT", "SFT on chosen"),
        ("Iterative DPO", "round 1"),
        ("Iterative DPO", "round 2"),
        ("Iterative DPO", "round 3"),
        ("Iterative DPO", "round 3 x 0.4"),
        ("Iterative DPO", "round 3 x 0.6"),
        ("Best-of-N", "N=1"),
        ("Best-of-N", "N=2"),
        ("Best-of-N", "N=4"),
    ]
    # iterative DPO samples as many completions as the one-round run: 3 rounds x 4 prompts x 2
    rounds = json.loads((out / "sweep" / "iterative" / "iterate.json").read_text())["rounds"]
    assert sum(r["data"]["samples"] for r in rounds) == 2 * 12
    assert sum(r["data"]["pairs"] for r in rounds) <= 12
    # the last round interpolated toward the initial model: lambda 0 would be the reference exactly
    liti = json.loads((out / "sweep/iterative/rounds/3/frontier-lambda-0.4/eval.json").read_text())
    assert liti["lambda"] == 0.4 and liti["generation"]["kl/sequence"] == result.frontier[6]["kl"]
    bon = [p for p in result.frontier if p["method"] == "Best-of-N"]
    assert bon[0]["kl"] == 0.0 and bon[1]["kl"] == pytest.approx(0.1931, abs=1e-4)
    assert bon[0]["reward"] <= bon[1]["reward"] <= bon[2]["reward"]  # the max over more samples never drops
    assert (out / "sweep" / "beta-0.5" / "eval.json").is_file() and (out / "report.html").is_file()
    assert "Reward vs KL frontier" in (out / "report.html").read_text()
    text = "\n".join(summary_lines(result))
    assert "win rate of policy over reference" in text and "Best-of-N" in text
