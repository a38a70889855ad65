"""Ctrl-C and SIGTERM: a run finishes its step, saves a resumable checkpoint, says how to go on and exits
128 + the signal's number without a traceback; resumed, it ends exactly where an uninterrupted run ends. A
second signal stops at once. The same in `dpokit iterate`."""

import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from dpokit.cli import main
from dpokit.config import load_config
from dpokit.loop import train
from dpokit.rundir import Run
from helpers import ENV, TINY_ITERATE, run_overrides

pytestmark = pytest.mark.slow
TIMING = {"tokens_per_s", "step_time_s"}


def overrides(model_dir, run_dir):
    # checkpoint_every=0 (the default): before this, Ctrl-C lost every step
    return run_overrides(
        model_dir, run_dir, "train.max_steps=60", "lora.dropout=0.1", "eval.every=7", "train.save_final=true"
    )


def started(cmd: list[str], ready, timeout: float = 120) -> subprocess.Popen:
    """`dpokit CMD` in a process of its own, once `ready()` holds (the run is between steps)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "dpokit", *cmd],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.01)
    return proc


def steps_logged(run_dir, n: int):
    path = run_dir / "metrics.jsonl"
    return lambda: path.exists() and len(path.read_text().splitlines()) >= n + 1  # + step 0


@pytest.mark.parametrize(
    "sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["ctrl-c", "sigterm"]
)
def test_a_stop_signal_saves_a_resumable_step_and_the_resume_ends_like_an_uninterrupted_run(
    tmp_path, tiny_model_dir, sig, code
):
    straight = train(
        load_config(None, [*overrides(tiny_model_dir, tmp_path / "straight"), "train.progress=false"])
    )
    run_dir = tmp_path / "stopped"
    proc = started(["train", *overrides(tiny_model_dir, run_dir)], steps_logged(run_dir, 3))
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err[-2000:]
    assert "Traceback" not in err
    name = signal.Signals(sig).name
    line = next(x for x in err.splitlines() if x.startswith("dpokit train: stopped:"))
    assert f"{name} after step" in line and f"dpokit train --resume {run_dir}" in line
    run = Run(run_dir)
    kept = run.latest_checkpoint
    step = int(kept.name.split("-")[1])
    assert 3 <= step < 60 and f"after step {step} of 60" in line
    assert run.summary["stopped"] == line.removeprefix("dpokit train: stopped: ")
    assert [r["step"] for r in run.history] == list(range(1, step + 1))

    assert main(["train", "--resume", str(run_dir)]) == 0
    strip = lambda records: [{k: v for k, v in r.items() if k not in TIMING} for r in records]  # noqa: E731
    assert strip(run.metrics) == strip(straight.run.metrics)
    a = load_file(str(straight.checkpoint / "adapter_model.safetensors"))
    b = load_file(str(run.final_checkpoint / "adapter_model.safetensors"))
    assert run.final_checkpoint.name == "step-60" and all(torch.equal(a[k], b[k]) for k in a)


def test_a_second_ctrl_c_stops_at_once(tmp_path, tiny_model_dir):
    run_dir = tmp_path / "run"
    proc = started(["train", *overrides(tiny_model_dir, run_dir)], steps_logged(run_dir, 2))
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err
    assert "stopped at once" in err or "stopped: SIGINT" in err  # the step may have ended between the two


def test_ctrl_c_in_iterate_keeps_the_finished_phases_and_continues(tmp_path, tiny_model_dir):
    run_dir = tmp_path / "it"
    argv = ["iterate", f"model.name={tiny_model_dir}", *TINY_ITERATE, f"train.run_dir={run_dir}"]
    proc = started(argv, lambda: (run_dir / "rounds" / "1" / "scores.jsonl").exists())
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130 and "Traceback" not in err, err[-2000:]
    line = next(x for x in err.splitlines() if x.startswith("dpokit iterate: stopped:"))
    assert f"dpokit iterate --resume {run_dir}" in line
    assert (run_dir / "rounds" / "1" / "samples.jsonl").exists()  # a finished phase stays
    assert main(["iterate", "--resume", str(run_dir)]) == 0
    assert [r.summary["round"] for r in Run(run_dir).rounds] == [1, 2]
