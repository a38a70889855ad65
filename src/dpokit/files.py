"""Writing so that a reader sees a file or folder whole or not at all: built under a temporary name beside
its target, then renamed (a rename within one file system is atomic). Model caches, tokenized data, exports
and `dpokit iterate`'s phase files all go through here."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def build_folder(target: Path, build: Callable[[Path], None], done: str) -> None:
    """Build a folder in a temp dir beside `target`, then rename it to `target` (which may exist empty). When
    another process renamed its own build first, theirs is kept if it holds the file `done`."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process won the race
            if not (target / done).exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_file(path: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` then rename tmp to `path`."""
    tmp = Path(path).with_name(f".{Path(path).name}.tmp-{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)
