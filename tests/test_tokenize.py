"""Tokenization: EOS, chat-template prefix property, truncation and drop counting."""

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
