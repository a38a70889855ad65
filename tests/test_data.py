"""Readers, format detection/normalization, bad-input errors, and the shared third-party files."""

import gzip
import json

import pytest

from dpokit.data import DataError, load_examples, split_by_prompt, split_implicit_prompt
from dpokit.data.formats import normalize

STANDARD = {"prompt": "Q: 2+2?", "chosen": " 4", "rejected": " 5"}


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# --- formats ---------------------------------------------------------------------------------------


def test_standard_format():
    ex = normalize("f:line 1", STANDARD)
    assert (ex.prompt, ex.chosen, ex.rejected, ex.format, ex.weight) == (
        "Q: 2+2?",
        " 4",
        " 5",
        "standard",
        1.0,
    )


def test_implicit_prompt_hh_style():
    c = "\n\nHuman: hi\n\nAssistant: hello!\n\nHuman: name?\n\nAssistant: Bob."
    r = "\n\nHuman: hi\n\nAssistant: hello!\n\nHuman: name?\n\nAssistant: I won't say."
    ex = normalize("f:line 1", {"chosen": c, "rejected": r})
    assert ex.format == "implicit"
    assert ex.prompt == "\n\nHuman: hi\n\nAssistant: hello!\n\nHuman: name?\n\nAssistant:"
    assert (ex.chosen, ex.rejected) == (" Bob.", " I won't say.")


def test_implicit_prompt_uses_common_prefix_not_each_sides_last_marker():
    # The rejected answer continues with its own inline turn: rfind on each side would split it later.
    c = "\n\nHuman: hi\n\nAssistant: Hello."
    r = "\n\nHuman: hi\n\nAssistant: Hey.\n\nHuman: ok\n\nAssistant: Bye."
    cut = split_implicit_prompt(c, r)
    assert c[:cut] == r[:cut] == "\n\nHuman: hi\n\nAssistant:"
    assert r.rfind("\n\nAssistant:") + len("\n\nAssistant:") != cut


def test_conversational_prompt_and_string_completions():
    rec = {"prompt": [{"role": "user", "content": "hi"}], "chosen": "hello", "rejected": "go away"}
    ex = normalize("f:line 1", rec)
    assert isinstance(ex.prompt, list) and ex.format == "conversational"
    assert ex.chosen == [{"role": "assistant", "content": "hello"}]


def test_conversational_whole_dialogues_share_prefix():
    u = {"role": "user", "content": "hi"}
    rec = {
        "chosen": [u, {"role": "assistant", "content": "a"}],
        "rejected": [u, {"role": "assistant", "content": "b"}],
    }
    ex = normalize("f:line 1", rec)
    assert ex.prompt == [u] and ex.chosen[0]["content"] == "a" and ex.rejected[0]["content"] == "b"


def test_sharegpt_format():
    rec = {
        "conversations": [{"from": "system", "value": "be nice"}, {"from": "human", "value": "hi"}],
        "chosen": {"from": "gpt", "value": "hello"},
        "rejected": {"from": "gpt", "value": "no"},
    }
    ex = normalize("f:line 1", rec)
    assert ex.format == "sharegpt"
    assert ex.prompt == [{"role": "system", "content": "be nice"}, {"role": "user", "content": "hi"}]
    assert ex.rejected == [{"role": "assistant", "content": "no"}]


def test_typed_content_parts():
    def msg(role, text):
        return {"role": role, "content": [{"type": "text", "value": text}], "loss_weight": 0.0}

    rec = {
        "chosen_messages": [msg("user", "q"), msg("assistant", "a")],
        "rejected_messages": [msg("user", "q"), msg("assistant", "b")],
    }
    ex = normalize("f:line 1", rec)
    assert ex.prompt == [{"role": "user", "content": "q"}] and ex.chosen[0]["content"] == "a"


def test_weight_field():
    assert normalize("w", {**STANDARD, "weight": 0.5}).weight == 0.5
    with pytest.raises(DataError, match="weight"):
        normalize("w", {**STANDARD, "weight": -1})


# --- bad input: file, line and field named ---------------------------------------------------------


@pytest.mark.parametrize(
    "bad, field, fragment",
    [
        ('{"prompt": "x", "chosen": "y", ', None, "malformed JSON"),
        ({"prompt": "x", "chosen": "y"}, "rejected", "missing field"),
        ({"prompt": "x", "chosen": 3, "rejected": "z"}, "chosen", "expected a string"),
        ({"prompt": "x", "chosen": "y", "rejected": "   "}, "rejected", "empty completion"),
        ([1, 2], None, "expected an object"),
    ],
)
def test_bad_record_names_file_line_and_field(tmp_path, bad, field, fragment):
    path = write_jsonl(tmp_path / "pairs.jsonl", [STANDARD, STANDARD, bad, STANDARD])
    with pytest.raises(DataError) as info:
        load_examples(str(path))
    message = str(info.value)
    assert f"{path}:line 3" in message and fragment in message
    if field:
        assert f"line 3: {field}:" in message
    assert "data.skip_invalid=true" in message


def test_skip_invalid_counts_instead(tmp_path):
    rows = [STANDARD, "{not json", {"prompt": "x", "chosen": "", "rejected": "z"}, STANDARD]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    examples, stats = load_examples(str(path), skip_invalid=True)
    assert len(examples) == 2 and stats.skipped == 2 and stats.records == 4
    assert sum(stats.skip_reasons.values()) == 2
    assert any("line 2" in e for e in stats.first_errors) and any("line 3" in e for e in stats.first_errors)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(DataError, match=r"nope.jsonl: no such file \(given as data.eval\)"):
        load_examples(str(tmp_path / "nope.jsonl"), key="data.eval")


def test_unknown_extension(tmp_path):
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DataError, match="unknown file type"):
        load_examples(str(tmp_path / "x.txt"))


def test_invalid_utf8_is_reported(tmp_path):
    (tmp_path / "bad.jsonl").write_bytes(b'{"prompt": "\xff\xfe"}\n')
    with pytest.raises(DataError, match="UTF-8"):
        load_examples(str(tmp_path / "bad.jsonl"))


# --- readers -----------------------------------------------------------------------------------------


def test_json_array_reports_line_of_each_record(tmp_path):
    text = '[\n  {"prompt": "a", "chosen": "b", "rejected": "c"},\n  {"prompt": "a", "chosen": "b"}\n]\n'
    (tmp_path / "arr.json").write_text(text)
    with pytest.raises(DataError, match=r"arr.json:line 3: rejected: missing field"):
        load_examples(str(tmp_path / "arr.json"))


def test_all_file_kinds_read_the_same_pairs(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": f"p{i}", "chosen": f"c{i}", "rejected": f"r{i}"} for i in range(5)]
    write_jsonl(tmp_path / "a.jsonl", rows)
    (tmp_path / "b.json").write_text(json.dumps(rows, indent=2))
    with gzip.open(tmp_path / "c.jsonl.gz", "wt") as fh:
        fh.write("\n".join(json.dumps(r) for r in rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    (tmp_path / "e.csv").write_text(
        "prompt,chosen,rejected\n" + "".join(f"p{i},c{i},r{i}\n" for i in range(5))
    )
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "f"))
    for name in ("a.jsonl", "b.json", "c.jsonl.gz", "d.parquet", "e.csv", "f"):
        examples, stats = load_examples(str(tmp_path / name))
        assert [(e.prompt, e.chosen, e.rejected) for e in examples] == [
            (r["prompt"], r["chosen"], r["rejected"]) for r in rows
        ], name


def test_split_by_prompt_keeps_prompts_on_one_side(tmp_path):
    rows = [{"prompt": f"p{i % 10}", "chosen": f"c{i}", "rejected": f"r{i}"} for i in range(40)]
    examples, _ = load_examples(str(write_jsonl(tmp_path / "a.jsonl", rows)))
    train, evals = split_by_prompt(examples, 0.2, seed=0)
    assert len(evals) == 8 and len(train) == 32
    assert not {e.prompt for e in train} & {e.prompt for e in evals}
    assert split_by_prompt(examples, 0.2, seed=0) == (train, evals)


def test_builtin_demo_data():
    examples, stats = load_examples("builtin:demo")
    assert len(examples) >= 200 and stats.skipped == 0 and all(isinstance(e.prompt, list) for e in examples)


# --- the shared third-party files ----------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("subset, n_pairs", [("harmless-base", 2312), ("helpful-base", 2354)])
def test_hh_rlhf_prompt_split(shared_data, subset, n_pairs):
    path = shared_data / "hh-rlhf" / subset / "test.jsonl.gz"
    raw = [json.loads(line) for line in gzip.open(path, "rt")]
    with pytest.raises(DataError, match="empty completion"):
        load_examples(str(path))  # 4 pairs per file have an empty final response
    examples, stats = load_examples(str(path), skip_invalid=True)
    assert stats.records == n_pairs and stats.valid == n_pairs - 4 and stats.skipped == 4
    assert stats.formats == {"implicit": n_pairs - 4}
    differs = 0
    for row in raw:
        cut = split_implicit_prompt(row["chosen"], row["rejected"])
        prompt = row["chosen"][:cut]
        assert row["rejected"].startswith(prompt) and prompt.endswith("\n\nAssistant:")
        m = "\n\nAssistant:"
        differs += row["chosen"][: row["chosen"].rfind(m)] != row["rejected"][: row["rejected"].rfind(m)]
    # Splitting each side at its own last marker disagrees on some pairs (5 harmless, 9 helpful per the
    # data README); the common-prefix split never does.
    assert differs == {"harmless-base": 5, "helpful-base": 9}[subset]


def test_llama_factory_sharegpt_and_v1(shared_data):
    en, stats = load_examples(str(shared_data / "llama-factory" / "dpo_en_demo.json"))
    assert len(en) == 300 and stats.formats == {"sharegpt": 300}
    assert all(e.prompt[-1]["role"] == "user" for e in en)
    zh, _ = load_examples(str(shared_data / "llama-factory" / "dpo_zh_demo.json"))
    assert len(zh) == 300
    v1, stats = load_examples(str(shared_data / "llama-factory" / "v1_dpo_demo.jsonl"))
    assert len(v1) == 10 and [m["role"] for m in v1[0].prompt] == ["system", "user"]
    assert v1[0].chosen[0]["role"] == "assistant" and v1[0].chosen != v1[0].rejected


def test_scores_are_read_in_every_format(tmp_path):
    from dpokit.data.filters import filter_pairs

    rows = [
        {
            "prompt": [{"role": "user", "content": "hi"}],
            "chosen": [{"role": "assistant", "content": "a"}],
            "rejected": [{"role": "assistant", "content": "b"}],
            "score_chosen": 5,
            "score_rejected": 4.5,
        },
        {
            "conversations": [{"from": "human", "value": "hello"}],
            "chosen": {"from": "gpt", "value": "a"},
            "rejected": {"from": "gpt", "value": "b"},
            "score_chosen": 9,
            "score_rejected": 1,
        },
        {
            "chosen": "\n\nHuman: hi\n\nAssistant: a",
            "rejected": "\n\nHuman: hi\n\nAssistant: b",
            "score_chosen": 2,
            "score_rejected": 1.9,
        },
    ]
    examples, _ = load_examples(str(write_jsonl(tmp_path / "scored.jsonl", rows)))
    assert [e.format for e in examples] == ["conversational", "sharegpt", "implicit"]
    assert [e.meta.get("score_chosen") for e in examples] == [5.0, 9.0, 2.0]
    kept, dropped = filter_pairs(examples, min_score_gap=1.0)
    assert [e.format for e in kept] == ["sharegpt"] and dropped == {"score gap < 1.0": 2}


def test_training_drops_duplicate_pairs_and_counts_them(tmp_path, tiny_model_dir):
    from dpokit.loop import train
    from helpers import load_cfg

    rows = [{"prompt": "p", "chosen": "good answer", "rejected": "bad answer"}] * 3
    rows.append({"prompt": "q", "chosen": "yes", "rejected": "no"})
    data = write_jsonl(tmp_path / "dups.jsonl", rows)
    result = train(
        load_cfg(
            tiny_model_dir, tmp_path / "r", f"data.train={data}", "data.eval_fraction=0", "train.max_steps=1"
        )
    )
    stats = json.loads((result.run_dir / "data_stats.json").read_text())
    assert stats["filtered"]["train"] == {"duplicate pair": 2}


def test_heavy_truncation_is_said_on_the_console(tmp_path, tiny_model_dir, caplog):
    from dpokit.loop import train
    from helpers import load_cfg

    rows = [{"prompt": f"word{i} " * 400, "chosen": "yes", "rejected": "no"} for i in range(6)]
    data = write_jsonl(tmp_path / "long.jsonl", rows)
    train(
        load_cfg(
            tiny_model_dir,
            tmp_path / "r",
            f"data.train={data}",
            "data.eval_fraction=0",
            "train.max_steps=1",
            "data.max_prompt_length=64",
            "data.max_length=96",
        )
    )
    said = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("6 of 6 prompts were cut to data.max_prompt_length=64" in m for m in said), said


def test_split_by_prompt_writes_disjoint_parts(tmp_path, capsys):
    import json

    from dpokit.cli import main

    rows = [
        {"prompt": f"q{i // 2}", "chosen": f"a{i}", "rejected": f"b{i}"} for i in range(40)
    ]  # 2 per prompt
    src = write_jsonl(tmp_path / "pairs.jsonl", rows)
    assert (
        main(["data", "split", str(src), "--out", str(tmp_path / "parts"), "--parts", "a=0.5,b=0.25,c=0.25"])
        == 0
    )
    assert "a: 20 pairs of 10 prompts" in capsys.readouterr().out
    parts = {
        n: [json.loads(x) for x in (tmp_path / "parts" / f"{n}.jsonl").read_text().splitlines()]
        for n in "abc"
    }
    prompts = {n: {r["prompt"] for r in rs} for n, rs in parts.items()}
    assert [len(prompts[n]) for n in "abc"] == [10, 5, 5] and sum(len(r) for r in parts.values()) == 40
    assert not (prompts["a"] & prompts["b"] or prompts["a"] & prompts["c"] or prompts["b"] & prompts["c"])
    assert (
        main(["data", "split", str(src), "--out", str(tmp_path / "again"), "--parts", "a=0.5,b=0.25,c=0.25"])
        == 0
    )
    assert (tmp_path / "again" / "b.jsonl").read_text() == (tmp_path / "parts" / "b.jsonl").read_text()


def test_split_chat_writes_hh_transcripts_as_messages(tmp_path):
    import json

    from dpokit.cli import main
    from dpokit.data.messages import transcript_messages

    prompt = "\n\nHuman: Hi there\n\nAssistant: Hello.\n\nHuman: How do I boil an egg?\n\nAssistant:"
    rows = [
        {"prompt": prompt, "chosen": " Put it in boiling water.", "rejected": " No."},
        {"prompt": "plain text prompt", "chosen": " a", "rejected": " b"},  # not a transcript: as it is
    ]
    src = write_jsonl(tmp_path / "pairs.jsonl", rows)
    assert main(["data", "split", str(src), "--out", str(tmp_path / "p"), "--parts", "all=1", "--chat"]) == 0
    got = {json.dumps(r["prompt"]): r for r in map(json.loads, (tmp_path / "p" / "all.jsonl").open())}
    chat = got[json.dumps(transcript_messages(prompt))]
    assert chat["prompt"] == [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "How do I boil an egg?"},
    ]
    assert (chat["chosen"], chat["rejected"]) == ("Put it in boiling water.", "No.")
    assert got[json.dumps("plain text prompt")]["chosen"] == " a"
    assert transcript_messages("no turns here") is None
    assert transcript_messages("preamble\n\nHuman: x\n\nAssistant:") is None
