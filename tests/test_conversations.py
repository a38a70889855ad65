"""Conversations as users have them: tool calls and tool results (arguments as a dict or a JSON string, a
`tools` column), several turns, `messages` + chosen/rejected strings, rated lists. Each record kind is
rendered through the chat template and checked token by token, with the tokens that are trained; a model
whose template drops tools is refused with the fix; a tool-call answer trains; the fast layouts score only
the trained tokens, exactly; `dpokit data filter` writes back what it read."""

import json
import math
import re

import pytest
import torch

from dpokit.batching import Layout
from dpokit.data import load_examples
from dpokit.data.formats import normalize, normalize_pairs
from dpokit.errors import DataError
from dpokit.models import chat_template_text, load_tokenizer
from dpokit.tokenize import tokenize_pairs

CALL = {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "the weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
TOOL_RECORD = {
    "prompt": [{"role": "user", "content": "Weather in Paris?"}],
    "chosen": [{"role": "assistant", "content": None, "tool_calls": [CALL]}],
    "rejected": "It is always sunny in Paris.",
    "tools": json.dumps([WEATHER]),
}
CALL_THEN_ANSWER = {
    "prompt": [{"role": "user", "content": "Weather in Paris?"}],
    "chosen": [
        {"role": "assistant", "content": "", "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "c1", "name": "get_weather", "content": {"celsius": 18}},
        {"role": "assistant", "content": "18 degrees."},
    ],
    "rejected": [{"role": "assistant", "content": "No idea."}],
    "tools": [WEATHER],
}


@pytest.fixture(scope="module")
def tools_tokenizer(tiny_model_dir):
    """The tiny model's tokenizer with dpokit's ChatML template with tools (its own renders content only)."""
    tokenizer = load_tokenizer(str(tiny_model_dir))
    tokenizer.chat_template = chat_template_text("chatml-tools")
    return tokenizer


def trained_text(tokenizer, ids, mask) -> str:
    return tokenizer.decode([t for t, m in zip(ids, mask or [True] * len(ids), strict=True) if m])


def test_tool_calls_and_the_tools_column_are_kept():
    e = normalize("f:line 1", TOOL_RECORD)
    assert e.chosen == [
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
            ],
        }
    ]
    assert e.rejected == [{"role": "assistant", "content": "It is always sunny in Paris."}]
    assert e.tools == [WEATHER]
    result = normalize("f:line 2", CALL_THEN_ANSWER).chosen[1]
    assert result == {
        "role": "tool",
        "content": '{"celsius": 18}',
        "tool_call_id": "c1",
        "name": "get_weather",
    }


@pytest.mark.parametrize(
    "broken, field, fragment",
    [
        ({"arguments": "{city: Paris}"}, "chosen[0].tool_calls[0].arguments", "not valid JSON"),
        ({"arguments": "[1, 2]"}, "chosen[0].tool_calls[0].arguments", "arguments must be a JSON object"),
        ({"name": ""}, "chosen[0].tool_calls[0]", "a tool call needs a function name"),
    ],
)
def test_a_bad_tool_call_names_its_field(broken, field, fragment):
    call = {"type": "function", "function": {**CALL["function"], **broken}}
    record = {**TOOL_RECORD, "chosen": [{"role": "assistant", "content": None, "tool_calls": [call]}]}
    with pytest.raises(DataError, match=re.escape(f"f:line 3: {field}: {fragment}")):
        normalize("f:line 3", record)


def test_messages_with_chosen_and_rejected_strings_are_the_next_turns_alternatives():
    record = {
        "messages": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Joke?"},
        ],
        "chosen": "Why did the chicken cross the road?",
        "rejected": "No.",
    }
    e = normalize("f:line 1", record)
    assert e.prompt == record["messages"] and e.chosen == [{"role": "assistant", "content": record["chosen"]}]
    with pytest.raises(DataError, match="ends with a assistant turn"):
        normalize("f:line 2", {**record, "messages": record["messages"][:2]})


def test_a_rated_list_is_the_best_against_each_worse_one_or_against_the_worst():
    ultrafeedback = {
        "instruction": "Name a prime.",
        "completions": [
            {"response": "4", "fine-grained_score": 1.25, "overall_score": 2.0},
            {"response": "7", "fine-grained_score": 4.75, "overall_score": 9.0},
            {"response": "9", "fine-grained_score": 1.25, "overall_score": 3.0},
            {"response": "2", "fine-grained_score": 4.0, "overall_score": 8.0},
        ],
    }
    pairs = normalize_pairs("f:line 1", ultrafeedback)
    assert [(p.chosen[0]["content"], p.rejected[0]["content"]) for p in pairs] == [
        ("7", "2"),
        ("7", "4"),
        ("7", "9"),
    ]
    assert (
        pairs[0].prompt == [{"role": "user", "content": "Name a prime."}] and pairs[0].format == "rated_list"
    )
    assert (pairs[0].meta["score_chosen"], pairs[0].meta["score_rejected"]) == (4.75, 4.0)
    (worst,) = normalize_pairs("f:line 1", ultrafeedback, "best_worst")
    assert (worst.chosen[0]["content"], worst.rejected[0]["content"]) == ("7", "9")
    plain = {"prompt": "Q", "completions": ["a", "b", "c"], "scores": [1, 1, 1]}
    (tie,) = normalize_pairs("f:line 2", plain)
    assert tie.meta["tie"]  # no preference: dropped before training, counted
    with pytest.raises(DataError, match=r"completions\[1\].score: expected a finite score"):
        normalize_pairs(
            "f:line 3", {"prompt": "Q", "completions": [{"text": "a", "score": 1}, {"text": "b"}]}
        )


def test_each_record_kind_renders_token_by_token_and_trains_the_assistant_turns(tools_tokenizer):
    tok = tools_tokenizer
    differ_early = {  # chosen and rejected differ before the last turn
        "chosen": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello, how can I help?"},
            {"role": "user", "content": "A joke"},
            {"role": "assistant", "content": "A pun."},
        ],
        "rejected": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "What."},
            {"role": "user", "content": "A joke"},
            {"role": "assistant", "content": "No."},
        ],
    }
    examples = [
        normalize(f"f:line {i}", r) for i, r in enumerate([TOOL_RECORD, CALL_THEN_ANSWER, differ_early], 1)
    ]
    pairs, stats = tokenize_pairs(examples, tok, 4096, 2048)
    assert stats.kept == 3
    schema = json.dumps(WEATHER)
    system = f"<|im_start|>system\nFunctions you can call, as JSON schemas:\n{schema}\nTo call one, answer"
    tool, answer, early = pairs
    assert tok.decode(tool.prompt_ids).startswith(system)
    assert tok.decode(tool.prompt_ids).endswith(
        "<|im_start|>user\nWeather in Paris?<|im_end|>\n<|im_start|>assistant\n"
    )
    call = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call><|im_end|>\n'
    assert tok.decode(tool.chosen_ids) == call and tool.chosen_targets is None  # one message: trained whole
    assert tok.decode(tool.rejected_ids) == "It is always sunny in Paris.<|im_end|>\n"
    full = (
        call + '<|im_start|>tool\n{"celsius": 18}<|im_end|>\n<|im_start|>assistant\n18 degrees.<|im_end|>\n'
    )
    assert tok.decode(answer.chosen_ids) == full
    # trained: the call and the answer, each with its end of turn; the tool's result and the assistant
    # header before the answer are context
    assert trained_text(tok, answer.chosen_ids, answer.chosen_targets) == call + "18 degrees.<|im_end|>\n"
    assert tok.decode(early.prompt_ids).endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert tok.decode(early.chosen_ids) == (
        "Hello, how can I help?<|im_end|>\n<|im_start|>user\nA joke<|im_end|>\n<|im_start|>assistant\nA pun.<|im_end|>\n"
    )
    assert (
        trained_text(tok, early.chosen_ids, early.chosen_targets)
        == "Hello, how can I help?<|im_end|>\nA pun.<|im_end|>\n"
    )
    # the next turn's alternatives, and a rated list's pairs, render as conversational pairs
    alternatives = normalize(
        "f:line 4", {"messages": [{"role": "user", "content": "Hi"}], "chosen": "Hello.", "rejected": "Go."}
    )
    rated = normalize_pairs("f:line 5", {"prompt": "Hi", "completions": ["Hello.", "Go."], "scores": [2, 1]})
    more, _ = tokenize_pairs([alternatives, *rated], tok, 4096, 2048)
    for p in more:
        assert tok.decode(p.prompt_ids) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        assert (
            tok.decode(p.chosen_ids) == "Hello.<|im_end|>\n"
            and tok.decode(p.rejected_ids) == "Go.<|im_end|>\n"
        )
    last, _ = tokenize_pairs(examples[2:], tok, 4096, 2048, targets="last")
    assert trained_text(tok, last[0].chosen_ids, last[0].chosen_targets) == "A pun.<|im_end|>\n"
    every, _ = tokenize_pairs(examples[2:], tok, 4096, 2048, targets="all")
    assert every[0].chosen_targets is None


def test_a_template_that_drops_tools_is_refused_with_the_fix(tiny_tokenizer):
    """The tiny model's own template renders message contents only, as SmolLM2's does."""
    with pytest.raises(
        DataError,
        match=r"leaves out tool calls and the tools column .*data.chat_template=chatml-tools",
    ):
        tokenize_pairs([normalize("f:line 1", CALL_THEN_ANSWER)], tiny_tokenizer, 512, 256)


def test_the_fast_layouts_score_only_the_trained_tokens_exactly(tiny_model_dir, tools_tokenizer):
    """Per-sequence log-probs from every layout equal a plain forward's, summed over the trained tokens."""
    from transformers import AutoModelForCausalLM

    from dpokit.attention import enable_blocks
    from dpokit.logps import CompletionLogps

    examples = [normalize("f:line 1", CALL_THEN_ANSWER), normalize("f:line 2", TOOL_RECORD)]
    pairs, _ = tokenize_pairs(examples, tools_tokenizer, 4096, 2048)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    want = []
    for side in ("chosen", "rejected"):
        for p in pairs:
            ids, mask = (
                getattr(p, f"{side}_ids"),
                getattr(p, f"{side}_targets") or [True] * len(getattr(p, f"{side}_ids")),
            )
            with torch.no_grad():
                logp = model(torch.tensor([p.prompt_ids + ids])).logits[0].log_softmax(-1)
            n = len(p.prompt_ids)
            want.append(sum(float(logp[n - 1 + t, c]) for t, c in enumerate(ids) if mask[t]))
    enable_blocks(model)
    clp = CompletionLogps(model)
    for layout in (Layout(), Layout(True), Layout(True, True, 64, "dense"), Layout(True, True, 64, "blocks")):
        batch = layout.pairs(pairs, tools_tokenizer.pad_token_id)
        with torch.no_grad():
            got = batch.sequence_sums(clp(*batch.model_args))
        assert got.tolist() == pytest.approx(want, abs=1e-4), layout
        assert batch.completion_lengths()[0] == sum(pairs[0].chosen_targets)


@pytest.mark.slow
def test_a_tool_call_answer_trains(tmp_path, tiny_model_dir):
    import dpokit

    records = [
        {**CALL_THEN_ANSWER, "prompt": [{"role": "user", "content": f"Weather in city {i}?"}]}
        for i in range(12)
    ] + [{**TOOL_RECORD, "prompt": [{"role": "user", "content": f"Weather {i}?"}]} for i in range(12)]
    run = dpokit.train(
        model=str(tiny_model_dir),
        data=records,
        **{
            "data.chat_template": "chatml-tools",
            "data.max_length": 512,
            "train.max_steps": 4,
            "train.batch_size": 8,
            "train.lr": 2e-3,
            "train.run_dir": str(tmp_path / "run"),
            "train.progress": False,
        },
    )
    first, last = run.history[0], run.history[-1]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6) and last["loss"] < first["loss"]
    assert last["rewards/margins"] > 0
    stats = run.data_stats
    assert stats["train_file"]["formats"] == {"conversational": 24}
    with pytest.raises(
        dpokit.DataError, match="data.chat_template=chatml-tools"
    ):  # its own template drops them
        dpokit.train(model=str(tiny_model_dir), data=records, **{"train.run_dir": str(tmp_path / "no")})
    assert not (tmp_path / "no").exists()


@pytest.mark.slow
def test_data_filter_writes_back_every_tool_field_and_check_reports_them(tmp_path, tiny_model_dir, capsys):
    from dpokit.cli import main

    records = [
        {**CALL_THEN_ANSWER, "weight": 2.0},
        TOOL_RECORD,
        {"prompt": "Q", "chosen": "a", "rejected": "b"},
        {"prompt": "Q", "chosen": "a", "rejected": "b"},  # a duplicate: dropped, counted
    ]
    src = tmp_path / "tools.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert main(["data", "filter", str(src), "--out", str(tmp_path / "clean.jsonl")]) == 0
    assert "kept 3 of 4 records" in capsys.readouterr().out
    before, _ = load_examples(str(src))
    after, _ = load_examples(str(tmp_path / "clean.jsonl"))
    fields = lambda e: (e.prompt, e.chosen, e.rejected, e.tools, e.weight)  # noqa: E731
    assert [fields(e) for e in after] == [fields(e) for e in before[:3]]  # what went in comes out
    assert main(["data", "check", str(src), "--model", str(tiny_model_dir), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["tools"] == {"records": 2, "tool_calls": 2, "with_schemas": 2}
    assert report["multi_message_completions"]["completions"] == 1
    assert report["weights"]["weighted"] == 1 and report["weights"]["max"] == 2.0
    assert any(
        "data.chat_template=chatml-tools" in tip for tip in report["advice"]
    )  # the tiny template drops them
