"""Exact resume: a run killed with SIGKILL resumes from its latest checkpoint to the same metrics and
weights as an uninterrupted run; unusable run dirs are refused before training starts."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from dpokit.cli import main
from dpokit.config import load_config
from dpokit.errors import TrainingError
from dpokit.files import read_jsonl as read_metrics
from dpokit.loop import train
from dpokit.rundir import Run
from helpers import cli_args, copy_run, run_overrides

TIMING = {"tokens_per_s", "step_time_s"}


def overrides(model_dir, run_dir, *extra):
    return run_overrides(
        model_dir,
        run_dir,
        "data.limit=120",
        "data.eval_fraction=0.1",
        "lora.dropout=0.1",  # exercises the saved RNG state
        "train.max_steps=30",
        "train.warmup_steps=3",
        "train.scheduler=cosine",
        "train.checkpoint_every=2",
        "train.save_final=true",
        "eval.every=5",
        *extra,
    )


def strip(records):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["loss.type=bco_pair"]], ids=["sigmoid", "bco_pair"])
def test_sigkill_then_resume_gives_the_same_result(tmp_path, tiny_model_dir, extra):
    reference = train(load_config(None, overrides(tiny_model_dir, tmp_path / "straight", *extra)))

    run_dir = tmp_path / "killed"
    cmd = [sys.executable, "-m", "dpokit.cli", "train", *overrides(tiny_model_dir, run_dir, *extra)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (run_dir / "checkpoints" / "step-4").exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    interrupted_at = int(Run(run_dir).latest_checkpoint.name.split("-")[1])
    assert 4 <= interrupted_at < 30, interrupted_at

    assert main(["train", "--resume", str(run_dir)]) == 0
    assert strip(read_metrics(run_dir / "metrics.jsonl")) == strip(
        read_metrics(reference.run_dir / "metrics.jsonl")
    )
    a = load_file(str(reference.checkpoint / "adapter_model.safetensors"))
    b = load_file(str(run_dir / "checkpoints" / "step-30" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 30 and summary["stopped"] == "completed all steps"


@pytest.mark.slow
def test_checkpoint_state_loads_without_unpickling(tmp_path, tiny_model_dir):
    result = train(load_config(None, overrides(tiny_model_dir, tmp_path / "r", "train.max_steps=2")))
    state = torch.load(result.checkpoint / "training_state.pt", weights_only=True)
    assert set(state) == {"optimizer", "scheduler", "torch_rng"}


@pytest.mark.slow
def test_resume_without_checkpoints_is_refused(tmp_path, tiny_model_dir):
    train(
        load_config(
            None,
            overrides(
                tiny_model_dir,
                tmp_path / "r",
                "train.max_steps=1",
                "train.save_final=false",
                "train.checkpoint_every=0",
            ),
        )
    )
    with pytest.raises(TrainingError, match="no resumable checkpoint"):
        train(load_config(tmp_path / "r" / "config.yaml", ["train.resume=true"]))


def test_unwritable_run_dir_is_refused_before_training(tmp_path, tiny_model_dir):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(TrainingError, match="is not writable"):
        train(load_config(None, overrides(tiny_model_dir, blocker / "run")))


def test_full_disk_is_refused_before_training(tmp_path, tiny_model_dir, monkeypatch):
    import shutil

    monkeypatch.setattr(
        shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 2**20, 2**20)
    )
    with pytest.raises(TrainingError, match="MiB free on its disk"):
        train(load_config(None, overrides(tiny_model_dir, tmp_path / "r")))


@pytest.mark.slow
def test_resume_of_a_finished_run_changes_nothing(tmp_path, tiny_lora_run, capsys):
    run = copy_run(tiny_lora_run, tmp_path / "r")
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    capsys.readouterr()
    assert main(["train", "--resume", str(run)]) == 0
    out = capsys.readouterr()
    assert (
        "the run is complete (completed all steps; checkpoint step-3, step 3 of 3); nothing to resume"
        in out.err
    )
    assert "nan" not in out.out + out.err
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


@pytest.mark.slow
def test_resume_with_a_config_file_is_refused(tmp_path, tiny_model_dir, capsys):
    run = tmp_path / "r"
    assert main(cli_args(tiny_model_dir, run, "train.checkpoint_every=1", "train.max_steps=2")) == 0
    other = tmp_path / "other.yaml"
    other.write_text("train:\n  max_steps: 9\n")
    assert main(["train", str(other), "--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert (
        f"(got {other})" in err
        and "give it as an override, e.g. train.max_steps=200" in err
        and "Traceback" not in err
    )


@pytest.mark.slow
def test_extending_a_finished_run_says_the_schedule_changes_and_follows_it(tmp_path, tiny_lora_run, caplog):
    """--resume RUN train.max_steps=5 on a 3-step run: the lr of step 4 is the new schedule's (linear decay
    over 5 steps: 5e-3 x (1 - 3/5)), not the old schedule's end (0), and the log says so."""
    run = Run(copy_run(tiny_lora_run, tmp_path / "r"))
    with caplog.at_level("WARNING"):
        assert main(["train", "--resume", str(run.path), "train.max_steps=5"]) == 0
    assert (
        "the run had 3 steps and now has 5: from step 4 on, the learning rate follows the new schedule"
        in caplog.text
    )
    lrs = {r["step"]: r["lr"] for r in run.history}
    assert lrs[3] == pytest.approx(5e-3 * (1 - 2 / 3)) and lrs[4] == pytest.approx(5e-3 * (1 - 3 / 5))
    assert lrs[5] == pytest.approx(5e-3 * (1 - 4 / 5)) and run.summary["steps"] == 5
