"""benchmarks/gpu_check.sh, the GPU checks in one run: on a machine without CUDA it says so in one line (exit
2), and `--smoke` runs every step of it on the CPU with the tiny model (the first thing a GPU user runs must
not crash on a typo)."""

import os
import subprocess
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def test_without_cuda_it_says_so_in_one_line(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the script would run")
    out = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "GPU_CHECK_OUT": str(tmp_path / "out")},
    )
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "gpu_check: no CUDA device for .venv/bin/python (torch.cuda.is_available() is False); --smoke runs "
        "the steps on the CPU"
    ]


def test_smoke_runs_every_step_on_the_cpu(tmp_path, shared_data):  # the benchmark reads HH pairs
    out = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh", "--smoke"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "GPU_CHECK_OUT": str(tmp_path / "out")},
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    printed = out.stdout
    for step in ("== 1.", "== 2.", "== 3.", "== 4.", "gpu_check: all checks passed"):
        assert step in printed, printed
    assert "bf16 lora: step 1 loss 0.69314" in printed and "bf16 full: step 1 loss 0.69314" in printed
    assert (
        "ddp, 1 process: largest difference" in printed and "fsdp, 1 process: largest difference" in printed
    )
    assert "1 passed" in printed  # the layout test
    assert "dpokit_fast" in printed  # the benchmark's table
