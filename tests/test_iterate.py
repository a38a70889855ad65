"""`dpokit iterate`: pairing rules on hand-made scores, the missing-EOS penalty, the judge, two rounds end to
end on the tiny model, the two reference choices, determinism, resume after SIGKILL in each phase, and clear
errors for a reward or judge that misbehaves."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dpokit.config import ConfigError, load_config
from dpokit.files import read_jsonl as read_metrics
from dpokit.pairing import judge_scores, pair_indices, penalized
from dpokit.rewards import RewardError, get_judge
from dpokit.rounds import FAULT_ENV, run_iterate
from helpers import TINY_ITERATE

HERE = Path(__file__).resolve().parent

ROUND_FILES = (
    "samples.jsonl",
    "scores.jsonl",
    "pairs.jsonl",
    "pair_stats.json",
    "eval.json",
    "eval_samples.jsonl",
    "round.json",
)


def overrides(model_dir, run_dir, *extra: str) -> list[str]:
    return [f"model.name={model_dir}", *TINY_ITERATE, f"train.run_dir={run_dir}", *extra]


def iterate(model_dir, run_dir, *extra: str):
    return run_iterate(load_config(None, overrides(model_dir, run_dir, *extra), "iterate"))


# ---- pairing, penalty, judge: hand-made numbers


def test_best_against_worst_takes_the_first_extremes_and_drops_ties():
    assert pair_indices([0.2, 0.9, 0.1, 0.9, 0.1], "best_worst", 0.0) == ([(1, 2)], 0)
    assert pair_indices([0.5, 0.5, 0.5], "best_worst", 0.0) == ([], 1)
    assert pair_indices([0.5, 0.6], "best_worst", 0.1) == ([], 1)  # a gap of 0.1 is not more than 0.1
    assert pair_indices([0.5, 0.7], "best_worst", 0.1) == ([(1, 0)], 0)


def test_every_pair_above_the_gap_better_one_first():
    pairs, ties = pair_indices([1.0, 3.0, 1.0, 2.0], "all_pairs", 0.0)
    assert pairs == [(1, 0), (3, 0), (1, 2), (1, 3), (3, 2)] and ties == 1  # (0, 2) tie
    pairs, ties = pair_indices([1.0, 3.0, 1.0, 2.0], "all_pairs", 1.0)
    assert pairs == [(1, 0), (1, 2)] and ties == 4


def test_missing_eos_penalty_hits_unfinished_completions_only():
    assert penalized([1.0, 1.0, -0.5], [True, False, False], 2.0) == [1.0, -1.0, -2.5]
    assert penalized([1.0], [False], 0.0) == [1.0]
    assert penalized([1.0, 1.0], [True, False], 0.5, [10, 20], 0.01) == pytest.approx([0.9, 0.3])


def test_judge_scores_are_mean_win_probabilities_in_both_orders():
    judge = get_judge("iterate_rewards:longer")
    # a (1 char) loses to both, b (2) beats a, ties c (2)
    assert judge_scores(judge, "p", ["a", "bb", "cc"]) == pytest.approx([0.0, 0.75, 0.75])
    assert judge_scores(get_judge("iterate_rewards:coin"), "p", ["x", "y"]) == [0.5, 0.5]
    with pytest.raises(RewardError, match=r"iterate_rewards:out_of_range.*returned 2.0.*\[0, 1\]"):
        judge_scores(get_judge("iterate_rewards:out_of_range"), "p", ["x", "y"])


# ---- two rounds end to end


@pytest.fixture(scope="module")
def two_rounds(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("iterate") / "run"
    return root, iterate(tiny_model_dir, root)


@pytest.mark.slow
def test_two_rounds_write_every_file_and_continue_the_policy(two_rounds):
    root, results = two_rounds
    assert [r.round for r in results] == [1, 2]
    for r in (1, 2):
        for name in ROUND_FILES:
            assert (root / "rounds" / str(r) / name).is_file(), (r, name)
        stats = json.loads((root / "rounds" / str(r) / "pair_stats.json").read_text())
        assert stats["prompts"] == 6 and stats["samples"] == 24
        assert stats["pairs"] + stats["ties_dropped"] + stats["identical_dropped"] == 6  # one per prompt
        # each pair is its prompt's best sample against its worst, and the stats say so: recomputed here
        samples = read_metrics(root / "rounds" / str(r) / "samples.jsonl")
        scores = [s["scores"] for s in read_metrics(root / "rounds" / str(r) / "scores.jsonl")]
        pairs = read_metrics(root / "rounds" / str(r) / "pairs.jsonl")
        assert [s["raw"] for s in read_metrics(root / "rounds" / str(r) / "scores.jsonl")] == [
            [float(len(c)) for c in s["completions"]] for s in samples
        ]  # iterate.reward=length: characters
        best = {json.dumps(s["prompt"]): (max(sc), min(sc)) for s, sc in zip(samples, scores, strict=True)}
        assert all((p["score_chosen"], p["score_rejected"]) == best[json.dumps(p["prompt"])] for p in pairs)
        margins = [p["score_chosen"] - p["score_rejected"] for p in pairs]
        assert stats["score_margin/mean"] == pytest.approx(sum(margins) / len(margins))
        gen = json.loads((root / "rounds" / str(r) / "eval.json").read_text())
        for key in ("reward/policy", "win_rate/initial", "win_rate/previous", "kl/sequence", "kl/token"):
            assert math.isfinite(gen[key]), key
        assert 0.0 <= gen["finished/policy"] <= 1.0
    # fresh prompts: round 2 samples the next six
    prompts = [read_metrics(root / "rounds" / str(r) / "samples.jsonl")[0]["prompt"] for r in (1, 2)]
    assert prompts[0] != prompts[1]
    # round 2 trains the adapter round 1 ended with, against the initial model (adapter off)
    cfg2 = load_config(root / "rounds" / "2" / "train" / "config.yaml")
    assert cfg2.model.adapter == str(root / "rounds" / "1" / "train" / "checkpoints" / "step-2")
    assert cfg2.model.reference == "base" and cfg2.train.group_by_prompt
    # a reference iterate chose is not a user's setting to warn about
    warnings = json.loads((root / "rounds" / "2" / "train" / "summary.json").read_text())["warnings"]
    assert not [w for w in warnings if "model.reference" in w]
    summary = json.loads((root / "iterate.json").read_text())
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    # round 1's held-out comparison with "previous" is the comparison with the initial model
    first = json.loads((root / "rounds" / "1" / "eval.json").read_text())
    assert first["win_rate/previous"] == first["win_rate/initial"]


def step1_loss(root: Path, r: int) -> float:
    return read_metrics(root / "rounds" / str(r) / "train" / "metrics.jsonl")[0]["loss"]


@pytest.mark.slow
def test_reference_initial_or_previous_decides_round_2s_starting_loss(two_rounds, tiny_model_dir, tmp_path):
    root, _ = two_rounds
    ln2 = math.log(2)
    assert step1_loss(root, 1) == pytest.approx(ln2, abs=1e-6)
    assert abs(step1_loss(root, 2) - ln2) > 1e-4  # the policy starts where round 1 ended, pi_ref does not
    prev = tmp_path / "previous"
    iterate(tiny_model_dir, prev, "iterate.reference=previous")
    assert step1_loss(prev, 2) == pytest.approx(ln2, abs=1e-6)  # pi_ref = the policy round 2 starts from
    assert load_config(prev / "rounds" / "2" / "train" / "config.yaml").model.reference == ""
    # the run, as `dpokit eval RUN` loads it, is measured against the initial model, as its rounds are;
    # its last round's own run dir against that round's reference (the policy it started from)
    from dpokit.trained import load_trained

    ids = torch.tensor([[1, 5, 7, 9, 11]])

    def ref_logits(target, reference):
        with load_trained(target, reference=reference).reference.module() as ref:
            return ref(input_ids=ids).logits

    run_ref, base = ref_logits(prev, True), ref_logits(prev, "base")
    assert torch.equal(run_ref, base)
    assert not torch.allclose(ref_logits(prev / "rounds" / "2" / "train", True), base)


def assert_same_runs(a: Path, b: Path) -> None:
    """The same round files, losses and final weights."""
    for r in (1, 2):
        for name in ROUND_FILES:
            assert (a / "rounds" / str(r) / name).read_text() == (b / "rounds" / str(r) / name).read_text(), (
                r,
                name,
            )
        la = [m["loss"] for m in read_metrics(a / "rounds" / str(r) / "train" / "metrics.jsonl")]
        lb = [m["loss"] for m in read_metrics(b / "rounds" / str(r) / "train" / "metrics.jsonl")]
        assert la == lb, r
    wa = load_file(a / "rounds" / "2" / "train" / "checkpoints" / "step-2" / "adapter_model.safetensors")
    wb = load_file(b / "rounds" / "2" / "train" / "checkpoints" / "step-2" / "adapter_model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
def test_same_config_same_rounds(two_rounds, tiny_model_dir, tmp_path):
    root, _ = two_rounds
    torch.manual_seed(1234)  # nothing a run does may depend on the global RNG state it finds
    again = tmp_path / "again"
    iterate(tiny_model_dir, again)
    assert_same_runs(root, again)


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["sampling", "scoring", "pairing", "training", "eval"])
def test_killed_in_any_phase_resumes_to_the_same_files_and_weights(
    phase, two_rounds, tiny_model_dir, tmp_path
):
    root, _ = two_rounds
    run = tmp_path / "killed"
    env = {**os.environ, FAULT_ENV: f"{phase}:2", "PYTHONPATH": str(HERE)}
    proc = subprocess.run(
        [sys.executable, "-m", "dpokit.cli", "iterate", *overrides(tiny_model_dir, run)],
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == -9, proc.stderr[-2000:]  # SIGKILL, as the kernel or a scheduler would
    assert (run / "rounds" / "1" / "round.json").is_file() and not (
        run / "rounds" / "2" / "round.json"
    ).exists()
    if phase == "training":  # step 1's checkpoint was written, step 2 never finished
        assert (run / "rounds" / "2" / "train" / "checkpoints" / "step-1").is_dir()
    iterate(tiny_model_dir, run)  # the same command again continues
    assert_same_runs(root, run)


@pytest.mark.slow
def test_a_round_over_the_kl_budget_is_pulled_back_and_the_next_round_starts_there(tiny_model_dir, tmp_path):
    budget = 0.04  # round 1 at lr 3e-2 ends at about 0.11 nats
    run = tmp_path / "budget"
    iterate(tiny_model_dir, run, "train.lr=3e-2", f"iterate.kl_budget={budget}", "iterate.lr_decay=0.5")
    record = json.loads((run / "rounds" / "1" / "kl_budget.json").read_text())
    assert (
        record["kl_before"] > budget
        and record["pulled"]
        and 0 < record["lambda"] < 1
        and record["kl"] <= budget
    )
    assert [t["lambda"] for t in record["tried"]][-1] == 1.0 and len(record["tried"]) == 6
    # the round ends with the pulled weights: its evaluation measures them, round 2 continues them
    assert json.loads((run / "rounds" / "1" / "eval.json").read_text())["kl/sequence"] == pytest.approx(
        record["kl"], abs=1e-6
    )
    assert json.loads((run / "rounds" / "1" / "round.json").read_text())["kl_budget"] == record
    pulled = run / "rounds" / "1" / "kl_budget"
    cfg2 = load_config(run / "rounds" / "2" / "train" / "config.yaml")
    assert cfg2.model.adapter == str(pulled)
    assert cfg2.train.lr == pytest.approx(1.5e-2)  # iterate.lr_decay=0.5: round 2 at half the rate
    # round 1 pulled toward the initial model: the adapter's B scaled by lambda, A as trained
    trained = load_file(
        run / "rounds" / "1" / "train" / "checkpoints" / "step-2" / "adapter_model.safetensors"
    )
    kept = load_file(pulled / "adapter_model.safetensors")
    for name, w in trained.items():
        want = w * record["lambda"] if ".lora_B." in name else w
        assert torch.allclose(kept[name], want, atol=1e-7), name
    # killed while pulling back, the same command continues to the same files
    killed = tmp_path / "killed"
    env = {**os.environ, FAULT_ENV: "kl_budget:1", "PYTHONPATH": str(HERE)}
    args = overrides(
        tiny_model_dir, killed, "train.lr=3e-2", f"iterate.kl_budget={budget}", "iterate.lr_decay=0.5"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "dpokit.cli", "iterate", *args], env=env, capture_output=True, text=True
    )
    assert proc.returncode == -9 and "pulled back to lambda" in proc.stderr, proc.stderr[-2000:]
    iterate(tiny_model_dir, killed, "train.lr=3e-2", f"iterate.kl_budget={budget}", "iterate.lr_decay=0.5")
    for r in (1, 2):
        for name in (*ROUND_FILES, "kl_budget.json"):
            assert (killed / "rounds" / str(r) / name).read_text() == (
                run / "rounds" / str(r) / name
            ).read_text()


# ---- user mistakes


@pytest.mark.slow
def test_a_reward_that_misbehaves_is_named_with_the_sample_and_nothing_is_lost(
    tiny_model_dir, tmp_path, monkeypatch
):
    from iterate_rewards import BROKEN

    run = tmp_path / "nan"
    spec = "iterate.reward=iterate_rewards:nan_in_round_2"
    monkeypatch.setenv(BROKEN, "1")
    with pytest.raises(
        RewardError, match=r"reward 'iterate_rewards:nan_in_round_2' returned nan for sample \d+ "
    ):
        iterate(tiny_model_dir, run, spec)
    done = (run / "rounds" / "1" / "round.json").read_text()
    assert (run / "rounds" / "2" / "samples.jsonl").is_file()
    assert not (run / "rounds" / "2" / "scores.jsonl").exists()
    monkeypatch.delenv(BROKEN)  # the user fixes the function and runs the same command again
    iterate(tiny_model_dir, run, spec)
    assert (run / "rounds" / "1" / "round.json").read_text() == done
    assert (run / "rounds" / "2" / "round.json").is_file()


@pytest.mark.slow
def test_a_reward_or_judge_that_raises_is_one_line_naming_it_and_the_sample(tiny_model_dir, tmp_path, capsys):
    from dpokit.cli import main

    base = ["iterate", f"model.name={tiny_model_dir}", *TINY_ITERATE, f"train.run_dir={tmp_path / 'r'}"]
    assert main([*base, "iterate.reward=iterate_rewards:raises_on_a_long_one"]) == 2
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("dpokit iterate:")]
    assert "Traceback" not in err and len(lines) == 1, err
    assert (
        "reward 'iterate_rewards:raises_on_a_long_one' raised ValueError: invalid literal for int()"
        in lines[0]
    )
    assert "on sample " in lines[0]
    judge = [
        *base,
        "train.overwrite=true",
        "iterate.judge=iterate_rewards:judge_that_raises",
        "iterate.eval_prompts=",
    ]
    assert main(judge) == 2
    err = capsys.readouterr().err
    assert (
        "judge 'iterate_rewards:judge_that_raises' raised KeyError: 'score' on (" in err
        and "Traceback" not in err
    )


@pytest.mark.slow
def test_a_reward_module_next_to_the_config_imports_from_any_folder(
    tiny_model_dir, tmp_path, monkeypatch, capsys
):
    from dpokit.cli import main

    project = tmp_path / "project"
    project.mkdir()
    (project / "my_scores.py").write_text(
        "def chars(prompts, completions):\n    return [float(len(c)) for c in completions]\n"
    )
    (project / "iterate.yaml").write_text("iterate:\n  reward: my_scores:chars\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(elsewhere))])
    overrides = [
        f"model.name={tiny_model_dir}",
        *TINY_ITERATE,
        "iterate.rounds=1",
        f"train.run_dir={tmp_path / 'r'}",
    ]
    overrides = [o for o in overrides if not o.startswith("iterate.reward=")]
    assert main(["iterate", str(project / "iterate.yaml"), *overrides]) == 0, capsys.readouterr().err
    assert main(["iterate", *overrides, "iterate.reward=nowhere_module:chars", "train.overwrite=true"]) == 2
    err = capsys.readouterr().err
    assert "module 'nowhere_module' is not found" in err and "PYTHONPATH" in err


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("iterate_rewards:wrong_count", r"returned 23 scores for 24 completions"),
        ("iterate_rewards:not_a_number", r"returned 'high' for sample 0 \(.*\): not a number"),
    ],
)
def test_a_reward_with_the_wrong_count_or_type_stops_round_1(spec, message, tiny_model_dir, tmp_path):
    with pytest.raises(RewardError, match=message):
        iterate(tiny_model_dir, tmp_path / "bad", f"iterate.reward={spec}")


def test_config_mistakes_are_listed_before_anything_runs(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(
            None,
            [
                "data.train=pairs.jsonl",
                "iterate.samples_per_prompt=1",
                "iterate.pairing=best",
                "iterate.reference=sft",
                "iterate.lr_decay=0",
                "iterate.kl_budget=2",
                "loss.type=kto",
            ],
            "iterate",
        )
    text = str(err.value)
    for needle in (
        "data.train='pairs.jsonl'",
        "iterate.prompts is empty",
        "iterate.samples_per_prompt=1",
        "iterate.pairing='best'",
        "iterate.reference='sft'",
        "iterate.lr_decay=0.0: must be > 0",
        "iterate.kl_budget is measured on held-out prompts: give iterate.eval_prompts too",
        "needs unpaired data",
    ):
        assert needle in text, needle


@pytest.mark.slow
def test_cli_iterate_help_and_a_missing_prompt_file(tmp_path, capsys):
    from dpokit.cli import main

    with pytest.raises(SystemExit) as info:
        main(["iterate", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "iterate.samples_per_prompt" in out and "iterate.min_score_gap" in out
    code = main(["iterate", "iterate.prompts=missing.jsonl", f"train.run_dir={tmp_path / 'x'}"])
    err = capsys.readouterr().err
    assert code == 2 and "missing.jsonl" in err and "no such file (given as iterate.prompts)" in err
    assert "Traceback" not in err and not (tmp_path / "x").exists()


@pytest.mark.slow
def test_report_of_an_iterate_run_shows_each_round_beside_the_curves(two_rounds):
    from dpokit.report import collect, write_report

    root, _ = two_rounds
    data = collect(root)
    assert [r["round"] for r in data["rounds"]] == [1, 2]
    steps = [m["step"] for m in data["metrics"]]
    assert steps == [1, 2, 3, 4] and [m["round"] for m in data["metrics"]] == [1, 1, 2, 2]
    page = write_report(root).read_text()
    assert "Rounds (on-policy DPO)" in page and "chart-rounds" in page and "Training curves" in page
    assert "win vs previous" in page


def test_a_judge_that_cannot_be_imported_is_called_a_judge():
    with pytest.raises(RewardError, match=r"^judge 'iterate_rewards:nope': cannot import 'nope'"):
        get_judge("iterate_rewards:nope")
