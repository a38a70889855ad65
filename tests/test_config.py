"""Config schema: YAML + overrides, every problem reported at once, field docs as help."""

import pytest

from dpokit.config import (
    ConfigError,
    TrainConfig,
    field_docs,
    help_text,
    iter_fields,
    load_config,
    parse_overrides,
)


def test_defaults_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  train: x.jsonl\nloss:\n  beta: 0.2\n")
    cfg = load_config(path, ["loss.beta=0.3", "lora.target_modules=[q_proj,k_proj]", "train.bf16=true"])
    assert cfg.loss.beta == 0.3 and cfg.loss.type == ["sigmoid"]
    assert cfg.lora.target_modules == ["q_proj", "k_proj"] and cfg.train.bf16 is True
    assert cfg.data.train == "x.jsonl"


def test_int_accepted_for_float():
    cfg = load_config(None, ["data.train=x", "train.lr=1"])
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)


def test_every_problem_is_listed_once():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["data.train=x", "loss.betta=0.1", "train.batch_size=two", "model.colour=red"])
    problems = info.value.problems
    assert len(problems) == 3
    text = str(info.value)
    assert "loss.betta: unknown key (did you mean loss.beta?)" in text
    assert "train.batch_size='two': expected an integer" in text
    assert "model.colour: unknown key" in text


def test_semantic_problems_all_reported():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["loss.beta=-1", "train.lr=0", "loss.type=nope", "data.max_prompt_length=600"])
    text = str(info.value)
    for fragment in (
        "data.train is empty",
        "loss.beta=-1",
        "train.lr=0",
        "unknown loss 'nope'",
        "max_prompt_length=600",
    ):
        assert fragment in text
    assert len(info.value.problems) == 5


def test_bad_yaml_file(tmp_path):
    (tmp_path / "c.yaml").write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(tmp_path / "c.yaml")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_override_syntax():
    nested, problems = parse_overrides(["a.b=1", "a.c=x", "bad"])
    assert nested == {"a": {"b": 1, "c": "x"}} and len(problems) == 1


@pytest.mark.slow
def test_every_field_has_a_docstring():
    missing = [key for key, _, _, doc in iter_fields() if not doc]
    assert missing == []
    assert field_docs(TrainConfig)["lr"].startswith("Peak learning rate")
    assert "train.grad_accum" in help_text()
