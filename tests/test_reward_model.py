"""Reward models (`dpokit train-rm`): the Bradley-Terry loss in closed form, the score head read at each
completion's last non-pad token exactly as transformers' own forward reads it in every layout, training end
to end to a folder that loads with AutoModelForSequenceClassification and scores as `model:RUN`, and exact
resume."""

import math

import pytest
import torch

import dpokit
from dpokit.batching import Layout
from dpokit.data.formats import PreferenceExample
from dpokit.losses import RewardPairs, bradley_terry
from dpokit.tokenize import tokenize_pairs

TIMING = ("tokens_per_s", "step_time_s")
TEXT_PAIRS = [
    {
        "prompt": f"\n\nHuman: name a colour number {i}\n\nAssistant:",
        "chosen": " Blue.",
        "rejected": " I won't.",
    }
    for i in range(12)
] + [
    {"prompt": f"\n\nHuman: say hi {i}\n\nAssistant:", "chosen": " Hi there!", "rejected": " Go away."}
    for i in range(12)
]


def test_bradley_terry_in_closed_form():
    x = RewardPairs(torch.tensor([1.0, -2.0]), torch.tensor([0.0, -1.0]), torch.tensor([0.5, 0.0]))
    out = bradley_terry(x)
    # -log sigma(1 - 0 - 0.5) = log(1 + e^-0.5); -log sigma(-2 + 1) = log(1 + e^1)
    assert out.losses.tolist() == pytest.approx([math.log1p(math.exp(-0.5)), math.log1p(math.e)])
    assert out.chosen_rewards.tolist() == [1.0, -2.0] and out.rejected_rewards.tolist() == [0.0, -1.0]
    centred = bradley_terry(x, center_rewards_coefficient=0.01)
    assert (centred.losses - out.losses).tolist() == pytest.approx([0.01 * 1.0, 0.01 * 9.0])
    assert not out.chosen_rewards.requires_grad
    c, r = torch.zeros(1, requires_grad=True), torch.zeros(1, requires_grad=True)
    bradley_terry(RewardPairs(c, r, torch.zeros(1))).losses.sum().backward()
    assert c.grad.item() == pytest.approx(-0.5) and r.grad.item() == pytest.approx(
        0.5
    )  # chosen up, rejected down


def test_every_layout_reads_the_score_where_transformers_does(tiny_model_dir, tiny_tokenizer):
    """The tiny tokenizer's pad is its EOS (as SmolLM2's): a text completion ends with EOS, and the score is
    read at the token before it; a chat completion ends with `<|im_end|>\\n`, read at the newline."""
    from dpokit.attention import enable_blocks
    from dpokit.logps import RewardScores
    from dpokit.models import load_reward_model

    chat = PreferenceExample(
        [{"role": "user", "content": "hi"}],
        [{"role": "assistant", "content": "hello there"}],
        [{"role": "assistant", "content": "bye"}],
        where="f:line 0",
    )
    text = [
        PreferenceExample(r["prompt"], r["chosen"], r["rejected"], where=f"f:line {i}")
        for i, r in enumerate(TEXT_PAIRS[:3])
    ]
    pairs, _ = tokenize_pairs([chat, *text], tiny_tokenizer, 256, 128)
    model = load_reward_model(str(tiny_model_dir), tiny_tokenizer.pad_token_id, seed=0).eval()
    want = []
    for side in ("chosen_ids", "rejected_ids"):
        for p in pairs:
            with torch.no_grad():
                want.append(float(model(torch.tensor([p.prompt_ids + getattr(p, side)])).logits[0, 0]))
    enable_blocks(model)
    scores = RewardScores(model)
    for layout in (Layout(), Layout(True), Layout(True, True, 48, "dense"), Layout(True, True, 48, "blocks")):
        batch = layout.pairs(pairs, tiny_tokenizer.pad_token_id)
        with torch.no_grad():
            got = scores(*batch.reward_args)
        got = got[batch.seq_map] if batch.seq_map is not None else got
        assert got.tolist() == pytest.approx(want, abs=1e-5), layout


def test_model_reward_scores_chat_samples_as_the_reward_model_trained_on_them(
    tmp_path, tiny_model_dir, tiny_tokenizer
):
    """Round and eval samples of a chat prompt reach `model:PATH` as messages: its score is the trained score
    of (prompt through the chat template, the completion as the assistant's message), not the score of some
    other text; other rewards get the prompt as the text the policy continued (with the assistant header)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from dpokit.rewards import get_reward, score_samples

    config = AutoConfig.from_pretrained(str(tiny_model_dir), num_labels=1)
    config.pad_token_id = tiny_tokenizer.pad_token_id
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_config(config).eval()
    model.save_pretrained(tmp_path / "rm")
    tiny_tokenizer.save_pretrained(tmp_path / "rm")
    prompt = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yes?"},
        {"role": "user", "content": "a colour"},
    ]
    answers = ["Blue.", "I will not say one, because colours are a matter of taste"]
    examples = [
        PreferenceExample(
            prompt,
            [{"role": "assistant", "content": a}],
            [{"role": "assistant", "content": "x"}],
            where="f:line 0",
        )
        for a in answers
    ]
    pairs, _ = tokenize_pairs(examples, tiny_tokenizer, 256, 128)
    with torch.no_grad():
        want = [float(model(torch.tensor([p.prompt_ids + p.chosen_ids])).logits[0, 0]) for p in pairs]
    reward = get_reward(f"model:{tmp_path / 'rm'}")
    assert score_samples(reward, [prompt, prompt], answers, tiny_tokenizer) == pytest.approx(want, abs=1e-5)
    seen = []
    length = get_reward("length")
    assert score_samples(lambda p, c: seen.extend(p) or length(p, c), [prompt], ["abc"], tiny_tokenizer) == [
        3.0
    ]
    assert seen == [tiny_tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)]


def rm_settings(run_dir, **extra) -> dict:
    return {
        "data.eval_fraction": 0.25,
        "train.batch_size": 6,
        "train.lr": 5e-3,
        "train.run_dir": str(run_dir),
        "train.progress": False,
        **extra,
    }


@pytest.mark.slow
def test_a_reward_model_trains_to_a_folder_that_scores_as_model_run(tmp_path, tiny_model_dir):
    from transformers import AutoModelForSequenceClassification

    from dpokit.rewards import get_reward

    run = dpokit.train_rm(
        model=str(tiny_model_dir), data=TEXT_PAIRS, **rm_settings(tmp_path / "rm", **{"train.max_steps": 8})
    )
    assert run.kind == "rm" and run.config.loss.type == ["bradley_terry"]
    first, last = run.metrics[0], run.history[-1]
    assert first["eval/loss"] > last["eval/loss"] and last["eval/rewards/accuracies"] == 1.0
    model = AutoModelForSequenceClassification.from_pretrained(run.reward_model_path).eval()
    assert model.config.num_labels == 1
    reward = get_reward(f"model:{run.path}")  # a train-rm run dir is a reward
    pair = TEXT_PAIRS[0]
    chosen, rejected = reward([pair["prompt"]] * 2, [pair["chosen"], pair["rejected"]])
    assert chosen > rejected
    # the folder's score is the trained score: RewardScores on the final weights == transformers' forward
    trained = dpokit.load(run, device="cpu")
    ids = trained.tokenizer(pair["prompt"] + pair["chosen"] + trained.tokenizer.eos_token)["input_ids"]
    with torch.no_grad():
        assert float(model(torch.tensor([ids])).logits[0, 0]) == pytest.approx(chosen, abs=1e-5)
        assert float(trained.model(torch.tensor([ids])).logits[0, 0]) == pytest.approx(chosen, abs=1e-5)


@pytest.mark.slow
def test_a_stopped_reward_model_run_resumes_to_the_same_weights(tmp_path, tiny_model_dir):
    from safetensors.torch import load_file

    settings = {"train.max_steps": 6, "train.checkpoint_every": 1, "lora.dropout": 0.1}
    straight = dpokit.train_rm(
        model=str(tiny_model_dir), data=TEXT_PAIRS, **rm_settings(tmp_path / "a", **settings)
    )

    def crash(record):
        if record["step"] == 3:
            raise RuntimeError("the machine went away")

    with pytest.raises(RuntimeError):
        dpokit.train_rm(
            model=str(tiny_model_dir),
            data=TEXT_PAIRS,
            callbacks=[crash],
            **rm_settings(tmp_path / "b", **settings),
        )
    resumed = dpokit.train_rm(resume=tmp_path / "b")
    strip = lambda rs: [{k: v for k, v in r.items() if k not in TIMING} for r in rs]  # noqa: E731
    assert strip(resumed.metrics) == strip(straight.metrics)
    a = load_file(str(straight.final_checkpoint / "adapter_model.safetensors"))
    b = load_file(str(resumed.final_checkpoint / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and any("score" in k for k in a) and all(torch.equal(a[k], b[k]) for k in a)


def test_reward_model_losses_are_for_train_rm_only():
    with pytest.raises(dpokit.ConfigError, match="bradley_terry trains a reward model: use dpokit train-rm"):
        dpokit.config(data={"train": "x.jsonl"}, loss={"type": ["bradley_terry"]})
    with pytest.raises(dpokit.ConfigError, match="dpokit train-rm trains with bradley_terry"):
        dpokit.config(data={"train": "x.jsonl"}, loss={"type": ["sigmoid"]}, command="rm")
