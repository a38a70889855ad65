"""Process-wide CPU backend switches, each behind a config key: the oneDNN fp32 matmul path (checked
for accuracy first) and a glibc allocator setting that returns freed memory to the OS."""

from __future__ import annotations

import logging

import torch

from dpokit.errors import TrainingError

log = logging.getLogger(__name__)


def use_low_memory_allocator() -> None:
    """glibc keeps freed heap memory for reuse, so peak RSS includes fragmentation; serving every allocation
    above 64 KiB with mmap returns it to the OS on free: a lower peak for slower steps (figures in
    docs/performance.md). No effect (and a warning) without glibc."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        m_trim_threshold, m_mmap_threshold = -1, -3  # mallopt parameter numbers from glibc's malloc.h
        ok = libc.mallopt(m_mmap_threshold, 65536) and libc.mallopt(m_trim_threshold, 65536)
    except (OSError, AttributeError):
        ok = False
    if not ok:
        log.warning(
            "train.low_memory_allocator: glibc mallopt is not available here; the setting has no effect"
        )


def apply_matmul_backend(fast: bool) -> None:
    """Route fp32 matmuls through oneDNN (`fp32_precision = "bf16"` on CPU) only after checking, on this
    CPU, that the result keeps fp32-level accuracy; some CPUs really compute it in bf16."""
    backend = torch.backends.mkldnn.matmul
    if not fast:
        backend.fp32_precision = "ieee"
        return
    backend.fp32_precision = "bf16"
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(256, 512, generator=g), torch.randn(512, 256, generator=g)
    exact = (a.double() @ b.double()).float()
    error = ((a @ b - exact).norm() / exact.norm()).item()
    if error > 1e-5:
        backend.fp32_precision = "ieee"
        raise TrainingError(
            f"train.fast_fp32_matmul=true: this CPU computes the oneDNN fp32 path with relative error {error:.1e} "
            "(bf16-level), which would change the results. Fix: set train.fast_fp32_matmul=false (or use train.bf16)."
        )
    log.info("fast fp32 matmul: oneDNN path, relative error %.1e against float64", error)
