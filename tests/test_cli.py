"""The command line as a new user meets it: every mistake ends in one clear line and exit code 2 before
anything is written (no traceback, no half-written run dir), help texts say what each option does, and long
phases say how far they are when output goes to a log file."""

import json
import os
import subprocess
import sys

import pytest

from dpokit.cli import main
from dpokit.files import read_jsonl as read_metrics
from helpers import cli_args


def one_line_error(capsys, *fragments) -> str:
    """The command's error: one `dpokit ...: error:` line holding every fragment, and no traceback."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("dpokit")]
    assert "Traceback" not in err and len(lines) == 1, err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


# --- models -------------------------------------------------------------------------------------------


def test_missing_model_folder(tmp_path, capsys):
    run = tmp_path / "r"
    assert (
        main(
            [
                "train",
                "data.train=builtin:demo",
                f"model.name={tmp_path / 'nope' / 'model'}",
                f"train.run_dir={run}",
            ]
        )
        == 2
    )
    one_line_error(capsys, "model.name=", "no such folder or file")
    assert not run.exists()


def test_hub_id_while_offline_fails_at_once(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    run = tmp_path / "r"
    assert (
        main(
            [
                "train",
                "data.train=builtin:demo",
                "model.name=someone/not-cached-model",
                f"train.run_dir={run}",
            ]
        )
        == 2
    )
    one_line_error(capsys, "someone/not-cached-model", "offline", "not in the local cache")
    assert not run.exists()


def test_hub_unreachable_fails_at_once(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert (
        main(
            [
                "train",
                "data.train=builtin:demo",
                "model.name=someone/not-cached-model",
                f"train.run_dir={tmp_path / 'r'}",
            ]
        )
        == 2
    )
    one_line_error(capsys, "someone/not-cached-model", "unreachable", "not in the local cache")


@pytest.mark.slow
def test_lora_target_modules_that_match_nothing(tmp_path, tiny_model_dir, capsys):
    run = tmp_path / "r"
    assert main(cli_args(tiny_model_dir, run, "lora.target_modules=[q_prj,v_proj]")) == 2
    line = one_line_error(capsys, "lora.target_modules", "no module named q_prj", "q_proj", "k_proj")
    assert "did you mean q_proj" in line
    assert not run.exists()


def test_max_length_above_the_model_context_is_refused(tmp_path, tiny_model_dir, capsys):
    run = tmp_path / "r"
    assert main(cli_args(tiny_model_dir, run, "data.max_length=4096")) == 2
    one_line_error(capsys, "data.max_length=4096", "2048")
    assert not run.exists()


def test_eval_of_a_missing_path(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "no-run"), "--data", "builtin:demo"]) == 2
    line = one_line_error(capsys, "no such folder or file")
    assert "not a run dir" not in line


# --- config, data and run dir ---------------------------------------------------------------------------


@pytest.mark.slow
def test_bad_config_and_bad_data_without_traceback(tmp_path, tiny_model_dir, capsys):
    assert main(["train", "data.train=x.jsonl", "loss.beta=-1", "train.lr=0"]) == 2
    err = capsys.readouterr().err
    assert "loss.beta=-1" in err and "train.lr=0" in err and "Traceback" not in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": "b"}\n')
    assert (
        main(
            ["train", f"data.train={bad}", f"model.name={tiny_model_dir}", f"train.run_dir={tmp_path / 'r'}"]
        )
        == 2
    )
    assert f"{bad}:line 2: rejected: missing field" in capsys.readouterr().err


def test_misspelt_loss_gets_a_suggestion(capsys):
    assert main(["train", "data.train=builtin:demo", "loss.type=sigmod"]) == 2
    one_line_error(capsys, "sigmod", "did you mean sigmoid")


def test_missing_tracker_package_is_refused_before_training(tmp_path, tiny_model_dir, capsys):
    from accelerate.utils import is_tensorboard_available

    if is_tensorboard_available():
        pytest.skip("tensorboard is installed here")
    run = tmp_path / "r"
    assert main(cli_args(tiny_model_dir, run, "train.report_to=[tensorboard]")) == 2
    one_line_error(capsys, "train.report_to", "pip install tensorboard")
    assert not run.exists()


@pytest.mark.slow
def test_a_run_that_fails_on_its_data_leaves_no_run_dir(tmp_path, tiny_model_dir, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    for data, fragment in (
        (empty, "no records"),
        (tmp_path / "missing.jsonl", "no such file (given as data.train)"),
    ):
        assert main(["train", f"data.train={data}", f"model.name={tiny_model_dir}"]) == 2
        one_line_error(capsys, fragment)
    assert not (tmp_path / "runs").exists()  # the default run dir, runs/<time>, was never made
    run = tmp_path / "explicit"
    assert main(["train", f"data.train={empty}", f"model.name={tiny_model_dir}", f"train.run_dir={run}"]) == 2
    one_line_error(capsys, "no records")
    assert not run.exists()
    # so --resume finds nothing to resume into
    assert main(["train", "--resume", str(run)]) == 2
    one_line_error(capsys, f"resume='{run}'", "no such folder")


@pytest.mark.slow
def test_missing_files_are_named_by_the_option_that_gave_them(tmp_path, capsys, tiny_lora_run):
    missing = tmp_path / "missing.jsonl"
    assert main(["data", "check", str(missing)]) == 2
    assert "data.train" not in one_line_error(capsys, str(missing), "no such file")
    run = tiny_lora_run.run_dir  # refused before anything is loaded or written
    assert main(["eval", str(run), "--data", str(missing)]) == 2
    assert "data.train" not in one_line_error(capsys, "--data", "no such file")


@pytest.mark.slow
def test_yaml_and_flag_overrides(tmp_path, tiny_model_dir):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model:\n  name: {tiny_model_dir}\ndata:\n  train: builtin:demo\n  limit: 8\n")
    assert (
        main(
            [
                "train",
                str(cfg),
                "train.max_steps=1",
                "--train.progress",
                "false",
                f"--train.run_dir={tmp_path / 'r'}",
            ]
        )
        == 0
    )
    assert len(read_metrics(tmp_path / "r" / "metrics.jsonl")) == 1


# --- help and progress ------------------------------------------------------------------------------------


def help_of(capsys, *args) -> str:
    with pytest.raises(SystemExit) as info:
        main([*args, "--help"])
    assert info.value.code == 0
    return " ".join(capsys.readouterr().out.split())


@pytest.mark.slow
def test_help_says_what_each_option_does_and_its_default(capsys):
    text = help_of(capsys, "eval")
    assert "--temperature TEMPERATURE Sampling temperature (0 = greedy) (default: 1.0)" in text
    assert "--max-new-tokens MAX_NEW_TOKENS Most tokens sampled per completion (default: 48)" in text
    text = help_of(capsys, "data", "filter")
    for flag in (
        "--max-similarity",
        "--min-agreement",
        "--min-score-gap",
        "--rebalance-length",
        "--deduplicate",
        "--skip-invalid",
        "--drop-identical",
    ):
        assert flag in text
    assert "Drop pairs whose annotator agreement" in text and "(default: pairs)" in text
    assert "--max-length MAX_LENGTH count truncation at this data.max_length (needs --model)" in help_of(
        capsys, "data", "check"
    )


def run_cli(args, **env):
    env = {**os.environ, "DPOKIT_PROGRESS_INTERVAL": "0", **env}
    return subprocess.run(
        [sys.executable, "-m", "dpokit.cli", *args], capture_output=True, text=True, env=env, timeout=300
    )


@pytest.mark.slow
def test_long_phases_report_progress_when_not_on_a_terminal(tmp_path, tiny_model_dir):
    """Output to a pipe (a log file): the reference pass, evaluation and sampling each print count lines."""
    run = tmp_path / "r"
    out = run_cli(
        cli_args(
            tiny_model_dir,
            run,
            "train.precompute_ref=true",
            f"train.ref_cache_dir={tmp_path / 'c'}",
            "train.save_final=true",
            "train.progress=true",
        )
    )
    assert out.returncode == 0, out.stderr
    assert "reference log-probs (train): 12/12 pairs" in out.stderr, out.stderr
    assert "evaluation: 6/6 pairs" in out.stderr, out.stderr
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Say {w}"}) + "\n" for w in ("a", "b", "c")))
    out = run_cli(
        ["eval", str(run), "--prompts", str(prompts), "--reward", "length", "--max-new-tokens", "4"]
    )
    assert out.returncode == 0, out.stderr
    assert "policy samples: 6/6 sequences" in out.stderr, out.stderr


@pytest.mark.slow
def test_overrides_after_flags_and_flags_only_where_they_apply(tmp_path, tiny_model_dir, capsys):
    # `CONFIG --loss.beta 0.2 key=value`: argparse leaves the override after the flag unplaced; it still applies
    assert (
        main(
            [
                "train",
                "configs/tiny.yaml",
                "--loss.beta",
                "0.2",
                f"model.name={tiny_model_dir}",
                "train.max_steps=1",
                "train.progress=false",
                f"train.run_dir={tmp_path / 'r'}",
            ]
        )
        == 0
    )
    assert "beta: 0.2" in (tmp_path / "r" / "config.yaml").read_text()
    with pytest.raises(SystemExit) as info:  # eval takes no config overrides: refused, not ignored
        main(["eval", str(tmp_path / "r"), "--data", "builtin:demo", "--loss.beta", "0.2"])
    assert info.value.code == 2 and "unrecognized arguments: loss.beta=0.2" in capsys.readouterr().err


def test_a_run_dir_that_cannot_be_written_is_refused_before_anything_loads(capsys, tiny_model_dir):
    assert (
        main(
            ["train", "data.train=builtin:demo", f"model.name={tiny_model_dir}", "train.run_dir=/proc/dpokit"]
        )
        == 2
    )
    one_line_error(capsys, "train.run_dir='/proc/dpokit' cannot be written: /proc")


def test_version(capsys):
    import dpokit

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.strip() == f"dpokit {dpokit.__version__}"


def test_a_hub_dataset_id_loads_through_datasets_or_says_why_not(
    capsys, tmp_path, monkeypatch, tiny_model_dir
):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run = tmp_path / "r"
    args = [
        "train",
        "data.train=trl-lib/ultrafeedback_binarized",
        f"model.name={tiny_model_dir}",
        f"train.run_dir={run}",
    ]
    assert main(args) == 2
    one_line_error(
        capsys,
        "the hub dataset 'trl-lib/ultrafeedback_binarized' (split 'train') cannot be loaded",
        "offline",
    )
    assert not run.exists()
    assert main([*args[:1], "data.train=missing/pairs.jsonl", *args[2:]]) == 2  # a path: no such file
    one_line_error(capsys, "missing/pairs.jsonl: no such file")


@pytest.mark.slow
def test_without_progress_each_step_is_still_one_log_line(tmp_path, tiny_model_dir, capsys):
    assert main(cli_args(tiny_model_dir, tmp_path / "r", "eval.every=2")) == 0
    err = capsys.readouterr().err
    steps = [line for line in err.splitlines() if "dpokit.progress: step " in line]
    assert len(steps) == 3 and "step    3 loss" in steps[-1]
    assert sum("dpokit.progress: eval @ step" in line for line in err.splitlines()) == 3  # start, 2, 3
