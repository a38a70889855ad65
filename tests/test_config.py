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


def test_trl_names_say_dpokits_key_and_dpo_is_sigmoid():
    with pytest.raises(ConfigError) as info:
        load_config(
            None,
            [
                "learning_rate=1e-5",
                "data.train=x.jsonl",
                "train.num_train_epochs=2",
                "loss.type=dpo",
                "output_dir=o",
            ],
        )
    text = str(info.value)
    assert "learning_rate: unknown key (TRL's learning_rate; here it is train.lr)" in text
    assert "train.num_train_epochs: unknown key (TRL's num_train_epochs; here it is train.epochs)" in text
    assert "output_dir: unknown key (TRL's output_dir; here it is train.run_dir)" in text
    assert "loss.type: unknown loss 'dpo' (DPO is loss.type=sigmoid, TRL's name for it)" in text


def test_a_config_files_relative_data_paths_are_read_from_its_folder(tmp_path, monkeypatch):
    project = tmp_path / "project" / "configs"
    project.mkdir(parents=True)
    (project.parent / "pairs.jsonl").write_text("")
    (project / "c.yaml").write_text(
        "data:\n  train: ../pairs.jsonl\n  eval: org/some-dataset\niterate:\n  prompts: builtin:reviews\n"
    )
    monkeypatch.chdir(tmp_path)
    cfg = load_config(project / "c.yaml")
    assert cfg.data.train == str((project.parent / "pairs.jsonl").resolve())
    assert cfg.data.eval == "org/some-dataset" and cfg.iterate.prompts == "builtin:reviews"  # left as written
    assert (
        load_config(None, ["data.train=../pairs.jsonl"]).data.train == "../pairs.jsonl"
    )  # the command line: cwd
