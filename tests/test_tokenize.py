"""Tokenization: EOS, chat-template prefix property, truncation and drop counting."""

import pytest

from dpokit.data.formats import PreferenceExample
from dpokit.tokenize import encode_example, tokenize_pairs


def text_pair(prompt="Question: hi", chosen=" yes", rejected=" no"):
    return PreferenceExample(prompt, chosen, rejected, where="f:line 1")


def test_text_pair_gets_eos(tiny_tokenizer):
    prompt, chosen, rejected = encode_example(text_pair(), tiny_tokenizer)
    eos = tiny_tokenizer.eos_token_id
    assert chosen[-1] == eos and rejected[-1] == eos
    assert tiny_tokenizer.decode(chosen[:-1]) == " yes"
    assert tiny_tokenizer.decode(prompt) == "Question: hi"


def test_conversational_completion_follows_prompt_tokens(tiny_tokenizer):
    ex = PreferenceExample(
        [{"role": "user", "content": "hi"}],
        [{"role": "assistant", "content": "hello"}],
        [{"role": "assistant", "content": "bye"}],
        where="f:line 1",
        format="conversational",
    )
    prompt, chosen, _ = encode_example(ex, tiny_tokenizer)
    assert tiny_tokenizer.decode(prompt).endswith("<|im_start|>assistant\n")
    assert tiny_tokenizer.decode(chosen) == "hello<|im_end|>\n"


def test_truncation_cuts_prompt_left_and_completion_right(tiny_tokenizer):
    ex = text_pair(prompt="abcdefghij", chosen="0123456789", rejected="xy")  # byte-level: 1 token per char
    pairs, stats = tokenize_pairs([ex], tiny_tokenizer, max_length=8, max_prompt_length=4)
    (p,) = pairs
    assert tiny_tokenizer.decode(p.prompt_ids) == "ghij"
    assert tiny_tokenizer.decode(p.chosen_ids) == "0123"
    assert tiny_tokenizer.decode(p.rejected_ids) == "xy<|im_end|>"
    assert stats.prompts_truncated == 1 and stats.completions_truncated == 1 and stats.kept == 1


def test_pair_with_no_room_left_is_dropped_and_counted(tiny_tokenizer):
    ex = text_pair(prompt="abcdefghij")
    pairs, stats = tokenize_pairs(
        [ex, text_pair(prompt="hi")], tiny_tokenizer, max_length=10, max_prompt_length=10
    )
    assert len(pairs) == 1
    assert stats.dropped == {"empty completion after truncation": 1}


def chat_pair(i: int, where: str = "f:line 1") -> PreferenceExample:
    return PreferenceExample(
        [{"role": "user", "content": f"question {i}"}],
        [{"role": "assistant", "content": f"answer {i} " * (i % 5 + 1)}],
        [{"role": "assistant", "content": f"no {i}"}],
        where=where,
        format="conversational",
    )


def one_at_a_time(examples, tokenizer, max_length, max_prompt_length):
    """The per-example statement of tokenize_pairs: encode_example, then the same truncation and drops."""
    from dpokit.tokenize import TokenizeStats, truncate

    stats, out = TokenizeStats(), []
    for ex in examples:
        prompt, *completions = encode_example(ex, tokenizer)
        prompt, completions, _ = truncate(prompt, completions, max_length, max_prompt_length, stats)
        if prompt and all(completions):
            out.append((prompt, *completions))
    return out


@pytest.mark.slow
def test_batched_tokenization_equals_one_text_at_a_time(tiny_tokenizer, shared_data, monkeypatch):
    """Text and conversational pairs mixed, across batch boundaries (batches of 7 here), and 3,000 HH pairs
    with SmolLM2's tokenizer: the ids of the batched calls are those of one text at a time."""
    from dpokit import tokenize
    from dpokit.data import load_examples
    from dpokit.models import load_tokenizer, resolve_model_path

    demo, _ = load_examples("builtin:demo")
    mixed = [x for i, ex in enumerate(demo[:20]) for x in (ex, chat_pair(i))]
    monkeypatch.setattr(tokenize, "ENCODE_BATCH", 7)
    pairs, stats = tokenize_pairs(mixed, tiny_tokenizer, max_length=48, max_prompt_length=24)
    assert [(p.prompt_ids, p.chosen_ids, p.rejected_ids) for p in pairs] == one_at_a_time(
        mixed, tiny_tokenizer, 48, 24
    )
    assert stats.completions_truncated > 0  # the cuts are exercised too
    monkeypatch.undo()
    smollm2 = load_tokenizer(resolve_model_path("smollm2-135m-instruct"))
    hh, _ = load_examples(str(shared_data / "hh-rlhf" / "helpful-base" / "test.jsonl.gz"), skip_invalid=True)
    hh = hh[:3000]
    pairs, _ = tokenize_pairs(hh, smollm2, max_length=1024, max_prompt_length=512)
    assert [(p.prompt_ids, p.chosen_ids, p.rejected_ids) for p in pairs] == one_at_a_time(
        hh, smollm2, 1024, 512
    )


def test_a_template_that_cannot_separate_prompt_from_answer_names_the_pair(tiny_tokenizer):
    import copy

    import pytest

    from dpokit.data import DataError

    odd = copy.deepcopy(tiny_tokenizer)  # the generation prompt says "bot", the rendered answer "assistant"
    odd.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>bot\n{% endif %}"
    )
    examples = [chat_pair(0, "f:line 1"), chat_pair(1, "f:line 2")]
    with pytest.raises(
        DataError, match=r"f:line 1: chosen: the chat template's prompt tokens are not a prefix"
    ):
        tokenize_pairs(examples, odd, max_length=64, max_prompt_length=32)
    pairs, stats = tokenize_pairs(examples, odd, max_length=64, max_prompt_length=32, skip_invalid=True)
    assert pairs == [] and stats.dropped == {"chat template prefix mismatch": 2}
