"""Reward registry: each built-in scorer against a hand computation, user functions, and clear errors."""

import sys

import pytest
import torch

from dpokit.rewards import RewardError, get_reward


def test_vader_orders_sentiment_and_scores_completion_or_full_text():
    score = get_reward("vader")
    pos, neg, neutral = score(
        ["The film"] * 3, ["was wonderful, I loved it.", "was awful and boring.", "was released in 1999."]
    )
    assert pos > 0.5 and neg < -0.5 and neutral == 0.0
    # the prompt counts only with vader:full
    assert get_reward("vader")(["I hated it. "], ["The end."]) == [0.0]
    assert get_reward("vader:full")(["I hated it. "], ["The end."])[0] < 0


def test_length_keywords_regex():
    assert get_reward("length")(["p", "p"], ["abc", ""]) == [3.0, 0.0]
    assert get_reward("length:words")(["p"], ["one two  three"]) == [3.0]
    kw = get_reward("keywords:great,-awful")
    assert kw(["p"] * 3, ["Great, truly GREAT.", "awful but great", "greatest"]) == [2.0, 0.0, 0.0]
    assert get_reward("regex:^The")(["p", "p"], ["The end", "the end"]) == [1.0, 0.0]


def test_length_in_tokens(tiny_model_dir, tiny_tokenizer):
    score = get_reward(f"length:tokens={tiny_model_dir}")
    text = "hello world"
    assert score(["p"], [text]) == [float(len(tiny_tokenizer(text, add_special_tokens=False)["input_ids"]))]


def test_user_function(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def shout(prompts, completions):\n    return [c.count('!') for c in completions]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert get_reward("my_rewards:shout")(["p", "p"], ["hi!!", "hi"]) == [2.0, 0.0]
    (tmp_path / "bad_rewards.py").write_text("def short(prompts, completions):\n    return [1.0]\n")
    with pytest.raises(RewardError, match="returned 1 scores for 2"):
        get_reward("bad_rewards:short")(["p", "p"], ["a", "b"])
    sys.modules.pop("my_rewards", None)
    sys.modules.pop("bad_rewards", None)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("sentiment", "unknown reward"),
        ("nosuchmodule_xyz:fn", "module .nosuchmodule_xyz. is not found"),
        ("regex:(", "not a valid regular expression"),
        ("length:bytes", "the unit is"),
        ("keywords:", "comma-separated"),
        ("vader:prompt", "option is 'full'"),
        ("model:/nonexistent/rm", "cannot load"),
    ],
)
def test_bad_specs_name_the_problem(spec, message):
    with pytest.raises(RewardError, match=message):
        get_reward(spec)


def test_reward_model_folder(tmp_path, tiny_model_dir, tiny_tokenizer):
    """A local sequence-classification folder scores prompt + completion with the logit of its label."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(
        tiny_model_dir, num_labels=2, id2label={0: "bad", 1: "good"}, label2id={"bad": 0, "good": 1}
    )
    config.pad_token_id = tiny_tokenizer.pad_token_id
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config).eval()
    model.save_pretrained(tmp_path / "rm")
    tiny_tokenizer.save_pretrained(tmp_path / "rm")
    prompts, completions = ["Q: hi ", "Q: a longer prompt "], ["yes", "no thanks"]
    got = get_reward(f"model:{tmp_path / 'rm'}@good")(prompts, completions)
    with torch.no_grad():
        want = [
            float(model(**tiny_tokenizer(p + c, return_tensors="pt")).logits[0, 1])
            for p, c in zip(prompts, completions, strict=True)
        ]
    assert got == pytest.approx(want, abs=1e-4)
    with pytest.raises(RewardError, match="no label 'great'"):
        get_reward(f"model:{tmp_path / 'rm'}@great")
