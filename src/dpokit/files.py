"""Files whole or absent, and JSON lines.

Writing so that a reader sees a file or folder whole or not at all: built under a temporary name beside its
target, then renamed (a rename within one file system is atomic). Model caches, tokenized data, checkpoints,
exports and the rounds' phase files all go through here. Imports nothing heavy: the data tools and the
report use it."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path


def build_folder(target: Path, build: Callable[[Path], None], done: str, replace: bool = False) -> None:
    """Build a folder in a temp dir beside `target`, then rename it to `target` (which may exist empty).
    When another process renamed its own build first, theirs is kept if it holds the file `done`.
    `replace`: an existing `target` is removed just before the rename (a checkpoint saved again)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(tmp)
        usual_permissions(tmp)
        if replace and target.exists():
            shutil.rmtree(target)
        try:
            os.replace(tmp, target)
        except OSError:  # another process won the race
            if not (target / done).exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def usual_permissions(folder: Path) -> None:
    """Give a folder built under a temp name, and everything in it, the permissions the umask gives new files
    (0755 / 0644 under umask 022): mkdtemp makes folders owner-only and some writers (safetensors) files too,
    which a server running as another user (a vLLM or TGI container) could not read."""
    mask = os.umask(0)
    os.umask(mask)
    for path in [Path(folder), *Path(folder).rglob("*")]:
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def write_file(path: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` then rename tmp to `path`."""
    tmp = Path(path).with_name(f".{Path(path).name}.tmp-{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def to_json_line(record) -> str:
    """One record as a JSON line (UTF-8, non-ASCII kept)."""
    return json.dumps(record, ensure_ascii=False) + "\n"


def read_jsonl(path: Path) -> list[dict]:
    """Every record of a JSON-lines file."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def write_jsonl(path: Path, rows: Iterable, atomic: bool = False) -> None:
    """Replace `path` with one JSON record per line; `atomic`: through a temp file and a rename."""
    text = "".join(to_json_line(r) for r in rows)
    if atomic:
        write_file(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    else:
        Path(path).write_text(text, encoding="utf-8")


def write_json(path: Path, value, atomic: bool = False) -> None:
    """`value` as indented JSON (values JSON cannot hold written as their str); `atomic` as for write_jsonl."""
    text = json.dumps(value, indent=2, default=str)
    if atomic:
        write_file(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    else:
        Path(path).write_text(text, encoding="utf-8")


def read_json(path: Path, missing=None):
    """The JSON value in `path`, or `missing` when there is no such file."""
    path = Path(path)
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else missing
