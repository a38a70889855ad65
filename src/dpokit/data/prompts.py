"""Prompt sets: what `dpokit eval` and `dpokit iterate` sample completions for."""

from __future__ import annotations

import json

from dpokit.data import resolve_data_path
from dpokit.data.readers import DataError, InMemory, read_records


def prompts_in_memory(value, name: str) -> InMemory:
    """Prompts given in Python: texts, chat-message lists, or records with a `prompt` field (a list or a
    datasets.Dataset), as records with a `prompt` field."""
    from dpokit.data.readers import in_memory

    if isinstance(value, InMemory):
        return value
    if isinstance(value, (list, tuple)):
        value = [{"prompt": p} if isinstance(p, (str, list)) else p for p in value]
    return in_memory(value, name)


def load_prompts(spec, split: str | None = None, limit: int = 0, key: str = "--prompts") -> list:
    """Unique prompts of a file (any record with a `prompt` field: prompt files and preference files) or of
    records in memory (InMemory), in first-seen order; `builtin:reviews` is the demo's movie-review openings.
    `split` keeps records whose `split` field equals it."""
    path = spec if isinstance(spec, InMemory) else resolve_data_path(spec, "prompts")
    if not isinstance(path, InMemory) and not path.exists():
        raise DataError(str(path), f"no such file (given as {key})")
    prompts, seen = [], set()
    for rec in read_records(path):
        if isinstance(rec, DataError):
            raise rec
        value = rec.value
        if not isinstance(value, dict) or "prompt" not in value:
            raise DataError(
                rec.where, "missing (every record needs a prompt: text or a list of chat messages)", "prompt"
            )
        prompt = value["prompt"]
        if not (isinstance(prompt, str) and prompt.strip()) and not (isinstance(prompt, list) and prompt):
            raise DataError(
                rec.where, "must be non-empty text or a non-empty list of chat messages", "prompt"
            )
        if split is not None and value.get("split") != split:
            continue
        key_ = json.dumps(prompt, sort_keys=True)
        if key_ not in seen:
            seen.add(key_)
            prompts.append(prompt)
        if limit and len(prompts) == limit:
            break
    if not prompts:
        where = path.name if isinstance(path, InMemory) else str(path)
        raise DataError(where, "no prompts" + (f" with split={split!r}" if split else ""))
    return prompts
