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


def test_hh_helpful_identical_and_empty_pairs_found(shared_data):
    report = check_file(str(shared_data / "hh-rlhf" / "helpful-base" / "test.jsonl.gz"))
    assert report["records"] == 2354 and report["valid"] == 2350
    assert report["identical_pairs"] == 2 and report["empty_completions"] == 4
    assert report["formats"] == {"implicit": 2350}
    assert any("chosen == rejected" in tip for tip in report["advice"])


def test_pandalm_agreement_distribution(shared_data):
    report = check_file(str(shared_data / "pandalm" / "testset-v1.json"))
    assert report["invalid"]["reasons"]["annotator1: annotators tie"] == 105  # the data README's tie count
    assert report["agreement"]["distribution"] == {"0.667": 98, "1.000": 744}
    assert report["formats"] == {"votes": 842}


def test_kto_file_is_reported_as_unpaired(shared_data):
    report = check_file(str(shared_data / "llama-factory" / "kto_en_demo.json"))
    assert report["kind"] == "unpaired" and report["labels"] == {"desirable": 150, "undesirable": 150}


def test_every_shared_file_checks_cleanly(shared_data):
    files = sorted(p for p in shared_data.rglob("*") if p.suffix in (".json", ".jsonl", ".gz"))
    assert len(files) == 7
    for path in files:
        report = check_file(str(path))
        assert report["valid"] > 0 and report["records"] >= report["valid"], path


def test_synthetic_set_triggers_each_finding(tmp_path):
    rows = [{"prompt": "p0", "chosen": "same answer", "rejected": "same answer"}]  # identical
    words = " ".join("abcdefghijklmnopqrs")
    rows += [{"prompt": "p1", "chosen": words + " t", "rejected": words + " u"}] * 2  # Dice 19/20 = 0.95; duplicate
    rows += [{"prompt": f"q{i}", "chosen": "long " * 20 + str(i), "rejected": "short"} for i in range(10)]  # length bias
    rows += [{"prompt": "q0", "chosen": "x", "rejected": ""}]  # empty + repeated prompt
    report = check_file(write_jsonl(tmp_path / "s.jsonl", rows))
    assert report["identical_pairs"] == 1 and report["duplicate_pairs"] == 1 and report["empty_completions"] == 1
    assert report["similarity"]["above_threshold"] == 1 + 2  # the identical pair and the two near-copies
    assert report["length"]["chosen_longer_share"] > 0.6
    assert report["repeated_prompts"]["prompts"] == 1
    advice = " ".join(report["advice"])
    for key in ("data.skip_invalid", "data.drop_identical", "data.max_similarity", "loss.type=sigmoid_norm", "loss.ld_alpha"):
        assert key in advice


def test_length_correlation_uses_scores_when_present(tmp_path):
    rows = [{"prompt": f"p{i}", "chosen": "w " * (i + 2), "rejected": "w", "score_chosen": float(i), "score_rejected": 0.0}
            for i in range(8)]
    report = check_file(write_jsonl(tmp_path / "s.jsonl", rows))
    assert report["length"]["correlation_basis"].startswith("Pearson")
    assert report["length"]["correlation"] == pytest.approx(1.0)
    assert report["score_gap"]["non_positive"] == 1  # i = 0


def test_truncation_needs_the_tokenizer(tmp_path, tiny_model_dir):
    from dpokit.models import load_tokenizer

    rows = [{"prompt": "x" * 50, "chosen": "yes", "rejected": "no"}, {"prompt": "short", "chosen": "y" * 40, "rejected": "n"}]
    report = check_file(write_jsonl(tmp_path / "s.jsonl", rows), load_tokenizer(str(tiny_model_dir)), 30, 20)
    assert report["truncation"]["prompts_truncated"] == 1 and report["truncation"]["completions_truncated"] == 1


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
    assert dropped == {"identical chosen and rejected": 1, "similarity > 0.5": 1, "confidence < 0.5": 1, "score gap < 0.5": 1}


def test_rebalance_length_evens_out_the_bias(tmp_path):
    rows = [{"prompt": f"p{i}", "chosen": "w " * 5, "rejected": "w"} for i in range(8)]
    rows += [{"prompt": f"q{i}", "chosen": "w", "rejected": "w " * 5} for i in range(2)]
    examples, _ = load_examples(write_jsonl(tmp_path / "f.jsonl", rows))
    kept, dropped = filter_pairs(examples, rebalance_length=True, seed=1)
    assert len(kept) == 4 and dropped == {"length rebalancing": 6}


def test_data_check_and_filter_cli(tmp_path, shared_data, capsys):
    hh = str(shared_data / "hh-rlhf" / "helpful-base" / "test.jsonl.gz")
    assert main(["data", "check", hh, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["identical_pairs"] == 2
    out = tmp_path / "clean.jsonl"
    assert main(["data", "filter", hh, "--out", str(out), "--skip-invalid", "--max-similarity", "0.9"]) == 0
    printed = capsys.readouterr().out
    assert "kept 2347 of 2350" in printed and "dropped 2: identical chosen and rejected" in printed
    assert "dropped 1: similarity > 0.9" in printed and "dropped 4: rejected: empty completion" in printed
    assert len(out.read_text().splitlines()) == 2347
