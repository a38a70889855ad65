"""`dpokit data check` and filtering: the shared files and synthetic sets built to trigger each finding."""

import json

import pytest

from dpokit.cli import main
from dpokit.data import load_examples
from dpokit.data.check import check_file, dice
from dpokit.data.filters import filter_pairs


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_dice_hand_worked():
    # C = {a, b, b, c}, R = {b, c, d}: common multiset {b, c} -> 2 * 2 / (4 + 3) = 4/7
    assert dice(list("abbc"), list("bcd")) == pytest.approx(4 / 7)
    assert dice(["x"], ["x"]) == 1.0 and dice(["x"], ["y"]) == 0.0


@pytest.mark.slow
def test_hh_helpful_identical_and_empty_pairs_found(shared_data):
    report = check_file(str(shared_data / "hh-rlhf" / "helpful-base" / "test.jsonl.gz"))
    assert report["records"] == 2354 and report["valid"] == 2350
    assert report["identical_pairs"] == 2 and report["empty_completions"] == 4
    assert report["formats"] == {"implicit": 2350}
    assert any("chosen == rejected" in tip for tip in report["advice"])


@pytest.mark.slow
def test_pandalm_agreement_distribution(shared_data):
    report = check_file(str(shared_data / "pandalm" / "testset-v1.json"))
    # the data README: 999 comparisons, 894 with a majority; of its 105 ties, 2 also have an empty response
    assert report["ties"] == 103 and report["invalid"]["count"] == 54
    assert report["agreement"]["distribution"] == {"0.667": 98, "1.000": 744}
    assert report["formats"] == {"votes": 945}


def test_kto_file_is_reported_as_unpaired(shared_data):
    report = check_file(str(shared_data / "llama-factory" / "kto_en_demo.json"))
    assert report["kind"] == "unpaired" and report["labels"] == {"desirable": 150, "undesirable": 150}


@pytest.mark.slow
def test_every_shared_file_checks_cleanly(shared_data):
    files = sorted(p for p in shared_data.rglob("*") if p.suffix in (".json", ".jsonl", ".gz"))
    assert len(files) == 7
    for path in files:
        report = check_file(str(path))
        assert report["valid"] > 0 and report["records"] >= report["valid"], path


def test_synthetic_set_triggers_each_finding(tmp_path):
    rows = [{"prompt": "p0", "chosen": "same answer", "rejected": "same answer"}]  # identical
    words = " ".join("abcdefghijklmnopqrs")
    rows += [
        {"prompt": "p1", "chosen": words + " t", "rejected": words + " u"}
    ] * 2  # Dice 19/20 = 0.95; duplicate
    rows += [
        {"prompt": f"q{i}", "chosen": "long " * 20 + str(i), "rejected": "short"} for i in range(10)
    ]  # length bias
    rows += [{"prompt": "q0", "chosen": "x", "rejected": ""}]  # empty + repeated prompt
    report = check_file(write_jsonl(tmp_path / "s.jsonl", rows))
    assert (
        report["identical_pairs"] == 1 and report["duplicate_pairs"] == 1 and report["empty_completions"] == 1
    )
    assert report["similarity"]["above_threshold"] == 1 + 2  # the identical pair and the two near-copies
    assert report["length"]["chosen_longer_share"] > 0.6
    assert report["repeated_prompts"]["prompts"] == 1
    advice = " ".join(report["advice"])
    for key in (
        "data.skip_invalid",
        "data.drop_identical",
        "data.max_similarity",
        "loss.type=sigmoid_norm",
        "loss.ld_alpha",
    ):
        assert key in advice


def test_length_correlation_uses_scores_when_present(tmp_path):
    rows = [
        {
            "prompt": f"p{i}",
            "chosen": "w " * (i + 2),
            "rejected": "w",
            "score_chosen": float(i),
            "score_rejected": 0.0,
        }
        for i in range(8)
    ]
    report = check_file(write_jsonl(tmp_path / "s.jsonl", rows))
    assert report["length"]["correlation_basis"].startswith("Pearson")
    assert report["length"]["correlation"] == pytest.approx(1.0)
    assert report["score_gap"]["non_positive"] == 1  # i = 0


def test_truncation_needs_the_tokenizer(tmp_path, tiny_model_dir):
    from dpokit.models import load_tokenizer

    rows = [
        {"prompt": "x" * 50, "chosen": "yes", "rejected": "no"},
        {"prompt": "short", "chosen": "y" * 40, "rejected": "n"},
    ]
    report = check_file(write_jsonl(tmp_path / "s.jsonl", rows), load_tokenizer(str(tiny_model_dir)), 30, 20)
    assert (
        report["truncation"]["prompts_truncated"] == 1 and report["truncation"]["completions_truncated"] == 1
    )


def test_filters_count_every_drop_by_reason(tmp_path):
    rows = [
        {"prompt": "a", "chosen": "x", "rejected": "x"},
        {"prompt": "b", "chosen": "one two three", "rejected": "one two four", "confidence": 0.9},
        {"prompt": "c", "chosen": "good", "rejected": "bad", "confidence": 0.2},
        {"prompt": "d", "chosen": "fine", "rejected": "poor", "score_chosen": 1.0, "score_rejected": 0.9},
        {"prompt": "e", "chosen": "ok", "rejected": "no", "score_chosen": 5.0, "score_rejected": 1.0},
    ]
    examples, _ = load_examples(write_jsonl(tmp_path / "f.jsonl", rows))
    kept, dropped = filter_pairs(examples, max_similarity=0.5, min_confidence=0.5, min_score_gap=0.5)
    assert [e.prompt for e in kept] == ["e"]
    assert dropped == {
        "identical chosen and rejected": 1,
        "similarity > 0.5": 1,
        "confidence < 0.5": 1,
        "score gap < 0.5": 1,
    }


def test_rebalance_length_evens_out_the_bias(tmp_path):
    rows = [{"prompt": f"p{i}", "chosen": "w " * 5, "rejected": "w"} for i in range(8)]
    rows += [{"prompt": f"q{i}", "chosen": "w", "rejected": "w " * 5} for i in range(2)]
    examples, _ = load_examples(write_jsonl(tmp_path / "f.jsonl", rows))
    kept, dropped = filter_pairs(examples, rebalance_length=True, seed=1)
    assert len(kept) == 4 and dropped == {"length rebalancing": 6}


@pytest.mark.slow
def test_data_check_and_filter_cli(tmp_path, shared_data, capsys):
    hh = str(shared_data / "hh-rlhf" / "helpful-base" / "test.jsonl.gz")
    assert main(["data", "check", hh, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["identical_pairs"] == 2
    out = tmp_path / "clean.jsonl"
    assert main(["data", "filter", hh, "--out", str(out), "--skip-invalid", "--max-similarity", "0.9"]) == 0
    printed = capsys.readouterr().out
    assert "kept 2347 of 2354 records" in printed and "dropped 2: identical chosen and rejected" in printed
    assert (
        "dropped 1: similarity > 0.9" in printed
        and "dropped 4: invalid: rejected: empty completion" in printed
    )
    assert len(out.read_text().splitlines()) == 2347


@pytest.mark.slow
def test_filter_deduplicates_and_check_then_stops_advising_it(tmp_path, shared_data, capsys):
    demo = shared_data / "llama-factory" / "dpo_en_demo.json"
    out = tmp_path / "clean.jsonl"
    assert main(["data", "filter", str(demo), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    kept = len(out.read_text().splitlines())
    assert kept < 300 and f"kept {kept} of 300 records" in printed and "duplicate pair" in printed
    assert main(["data", "check", str(out)]) == 0
    advice = [line for line in capsys.readouterr().out.splitlines() if line.startswith("advice")]
    assert not any("duplicate" in line for line in advice), advice


def test_deduplicate_modes(tmp_path):
    rows = [
        {"prompt": "p", "chosen": "a", "rejected": "b"},
        {"prompt": "p", "chosen": "a", "rejected": "b"},
        {"prompt": "p", "chosen": "a", "rejected": "c"},
        {"prompt": "q", "chosen": "a", "rejected": "b"},
    ]
    examples, _ = load_examples(write_jsonl(tmp_path / "d.jsonl", rows))
    assert filter_pairs(examples)[1] == {"duplicate pair": 1}  # the default
    kept, dropped = filter_pairs(examples, deduplicate="prompt_chosen")
    assert [e.rejected for e in kept] == ["b", "b"] and dropped == {
        "duplicate pair": 1,
        "repeated prompt + chosen": 1,
    }
    assert len(filter_pairs(examples, deduplicate="off")[0]) == 4


def test_check_reports_an_empty_file(tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    main(["data", "check", str(empty)])
    out = capsys.readouterr().out
    assert "no problems found" not in out and "the file holds no records" in out


def test_check_names_the_columns_of_a_csv_of_another_format(tmp_path, capsys):
    path = tmp_path / "wrong.csv"
    path.write_text("question,good,bad\nq,a,b\n")
    main(["data", "check", str(path)])
    out = " ".join(capsys.readouterr().out.split())
    assert "no problems found" not in out
    assert "found fields ['bad', 'good', 'question']; expected prompt/chosen/rejected" in out


def test_check_reports_length_bias_toward_the_rejected_side(capsys):
    main(["data", "check", "builtin:demo"])
    out = " ".join(capsys.readouterr().out.split())
    assert "no problems found" not in out
    assert "rejected is longer in 75% of pairs (r = -0.86); DPO will learn to write shorter" in out


def test_check_max_length_without_a_model_is_an_error(capsys):
    assert main(["data", "check", "builtin:demo", "--max-length", "128"]) == 2
    err = capsys.readouterr().err
    assert "--max-length" in err and "(--model)" in err and "Traceback" not in err


@pytest.mark.slow
def test_check_text_report_shows_where_invalid_records_are(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": "b"}\n')
    main(["data", "check", str(bad)])
    assert f"{bad}:line 2: rejected: missing field" in capsys.readouterr().out


@pytest.mark.slow
def test_check_reports_annotator_ties_as_ties(shared_data, capsys):
    main(["data", "check", str(shared_data / "pandalm" / "testset-v1.json")])
    out = " ".join(capsys.readouterr().out.split())
    assert "annotator ties │ 103" in out, out  # no preference: dropped before training, not "invalid"
    assert "invalid │ 54 " in out and "annotators tie" not in out, out


def test_filter_hint_names_its_own_flag(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "b"}\n')
    assert main(["data", "filter", str(bad), "--out", str(tmp_path / "o.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "--skip-invalid" in err and "data.skip_invalid" not in err


@pytest.mark.slow
def test_filter_counts_add_up(tmp_path, shared_data, capsys):
    pandalm = shared_data / "pandalm" / "testset-v1.json"
    out = tmp_path / "o.jsonl"
    assert (
        main(["data", "filter", str(pandalm), "--out", str(out), "--skip-invalid", "--min-agreement", "1.0"])
        == 0
    )
    printed = capsys.readouterr().out
    kept = len(out.read_text().splitlines())
    assert f"kept {kept} of 999 records" in printed, printed
    dropped = [line.split(":", 1) for line in printed.splitlines() if line.strip().startswith("dropped")]
    assert kept + sum(int(n.split()[1]) for n, _ in dropped) == 999, printed
    assert any("annotator tie" in reason for _, reason in dropped)


def test_data_check_of_a_file_with_nothing_trainable_exits_2_after_the_report(tmp_path, capsys):
    from dpokit.cli import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "b"}\n{"question": "x"}\n')
    assert main(["data", "check", str(bad)]) == 2
    out = capsys.readouterr()
    assert "records / valid" in out.out  # the report first: it says why
    assert f"dpokit data: error: {bad}: nothing to train on: none of its 2 records is usable" in out.err
    good = tmp_path / "good.jsonl"
    good.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    assert main(["data", "check", str(good)]) == 0
