"""Property-based fuzzing of the readers, format normalization and tokenization: every input ends in a
result, a counted skip or a DataError naming the file (and line) -- never an unhandled exception."""

import gzip
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dpokit.data import DataError, load_examples
from dpokit.tokenize import tokenize_pairs, tokenize_unpaired

SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

text = st.text(max_size=40) | st.sampled_from(["", " ", "\n\nHuman: hi\n\nAssistant: yo", "x" * 5000])
scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | text
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4),
    max_leaves=12,
)
message = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["user", "assistant", "system", "gpt", "human", "alien", 3]),
        "content": text | json_values,
    }
)
FIELDS = [
    "prompt",
    "chosen",
    "rejected",
    "completion",
    "label",
    "weight",
    "messages",
    "conversations",
    "response1",
    "response2",
    "instruction",
    "annotator1",
    "score_chosen",
    "chosen_messages",
]
record = st.dictionaries(
    st.sampled_from(FIELDS), text | json_values | st.lists(message, max_size=3) | message, max_size=6
)
line = (
    record.map(json.dumps)
    | json_values.map(json.dumps)
    | text
    | st.binary(max_size=30).map(lambda b: b.decode("latin-1"))
)


def check_load(path, tokenizer, unpaired):
    for skip in (True, False):
        try:
            examples, stats = load_examples(str(path), skip_invalid=skip, unpaired=unpaired)
        except DataError as err:
            assert str(path) in str(err)
            continue
        assert stats.valid == len(examples) and stats.valid + stats.skipped == stats.records
        tokenize = tokenize_unpaired if unpaired else tokenize_pairs
        try:
            pairs, tstats = tokenize(
                examples, tokenizer, max_length=24, max_prompt_length=12, skip_invalid=True
            )
        except DataError:
            continue
        assert tstats.kept == len(pairs) and tstats.kept + sum(tstats.dropped.values()) == len(examples)


@pytest.mark.slow
@SETTINGS
@given(lines=st.lists(line, max_size=8), unpaired=st.booleans())
def test_jsonl_lines(tmp_path_factory, tiny_tokenizer, lines, unpaired):
    path = tmp_path_factory.mktemp("fuzz") / "data.jsonl"
    # lone surrogates become invalid UTF-8 bytes: the reader must name the file, not crash
    path.write_bytes("\n".join(lines).encode("utf-8", "surrogatepass"))
    check_load(path, tiny_tokenizer, unpaired)


@pytest.mark.slow
@SETTINGS
@given(value=json_values | st.lists(record, max_size=6), unpaired=st.booleans())
def test_json_documents(tmp_path_factory, tiny_tokenizer, value, unpaired):
    path = tmp_path_factory.mktemp("fuzz") / "data.json"
    path.write_text(json.dumps(value, indent=1))
    check_load(path, tiny_tokenizer, unpaired)


@SETTINGS
@given(raw=st.binary(max_size=200), gz=st.booleans())
def test_raw_bytes_and_gzip(tmp_path_factory, tiny_tokenizer, raw, gz):
    path = tmp_path_factory.mktemp("fuzz") / ("data.jsonl.gz" if gz else "data.jsonl")
    path.write_bytes(gzip.compress(raw) if gz and raw[:1] != b"x" else raw)
    check_load(path, tiny_tokenizer, False)


VALID_GZ = gzip.compress(b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n' * 50)


@pytest.mark.slow
@SETTINGS
@given(
    edits=st.lists(
        st.tuples(st.integers(10, len(VALID_GZ) - 1), st.integers(0, 255)), min_size=1, max_size=4
    ),
    cut=st.integers(11, len(VALID_GZ)),
)
def test_corrupted_gzip(tmp_path_factory, tiny_tokenizer, edits, cut):
    # a corrupted deflate stream raises zlib.error, which is not an OSError: found by this test
    data = bytearray(VALID_GZ)
    for pos, value in edits:
        data[pos] = value
    path = tmp_path_factory.mktemp("fuzz") / "data.jsonl.gz"
    path.write_bytes(bytes(data[:cut]))
    check_load(path, tiny_tokenizer, False)


@pytest.mark.slow
@SETTINGS
@given(
    rows=st.lists(
        st.fixed_dictionaries({"prompt": text, "chosen": text, "rejected": text}), min_size=1, max_size=5
    )
)
def test_csv(tmp_path_factory, tiny_tokenizer, rows):
    import csv

    path = tmp_path_factory.mktemp("fuzz") / "data.csv"
    with path.open("w", newline="", encoding="utf-8", errors="replace") as fh:
        writer = csv.DictWriter(fh, fieldnames=["prompt", "chosen", "rejected"])
        writer.writeheader()
        writer.writerows(rows)
    check_load(path, tiny_tokenizer, False)


def test_mixed_formats_in_one_file_name_each_bad_line(tmp_path):
    rows = [
        {"prompt": "p", "chosen": "a", "rejected": "b"},
        {"prompt": "p", "completion": "a", "label": True},
        {
            "conversations": [{"from": "human", "value": "hi"}],
            "chosen": {"from": "gpt", "value": "a"},
            "rejected": {"from": "gpt", "value": "b"},
        },
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(DataError, match=r"mixed.jsonl:line 2: label: an unpaired record"):
        load_examples(str(path))
    examples, stats = load_examples(str(path), skip_invalid=True)
    assert stats.formats == {"standard": 1, "sharegpt": 1} and stats.skipped == 1
