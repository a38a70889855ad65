"""Comparisons to label: from a file of completions, or sampled on the spot from a model or run (the rounds'
sampler, K samples per prompt). A prompt with K distinct completions gives K(K-1)/2 comparisons."""

from __future__ import annotations

from pathlib import Path

from dpokit.data.readers import DataError, read_records
from dpokit.files import write_jsonl
from dpokit.labels.store import pairs_of

TEXT_KEYS = ("text", "content", "response", "completion")
"""A completion given as an object: its text is under one of these keys."""


def from_file(path: str | Path) -> tuple[list, dict]:
    """Comparisons of a JSONL/JSON file whose records are a prompt (text or chat messages) with either a list
    of `completions` (strings, or objects with a text field), or two completions (`chosen` / `rejected`,
    or `response1` / `response2`: labeled again, blind). Returns (comparisons, counts)."""
    path = Path(path)
    if not path.exists():
        raise DataError(str(path), "no such file (given as --data)")
    items, counts = [], {"records": 0, "identical": 0}
    for rec in read_records(path):
        if isinstance(rec, DataError):
            raise rec
        value, where = rec.value, rec.where
        if not isinstance(value, dict):
            raise DataError(
                where, f"expected an object with a prompt and completions, got {type(value).__name__}"
            )
        prompt = value.get("prompt", value.get("instruction"))
        if not (isinstance(prompt, str) and prompt.strip()) and not (isinstance(prompt, list) and prompt):
            raise DataError(where, "missing or empty (text or a list of chat messages)", "prompt")
        completions = _completions(where, value)
        found, identical = pairs_of(prompt, completions, {"record": counts["records"]})
        items += found
        counts["records"] += 1
        counts["identical"] += identical
    if not items:
        raise DataError(str(path), "no comparisons: every record's completions are identical")
    return items, counts


def _completions(where: str, value: dict) -> list[str]:
    for a, b in (("chosen", "rejected"), ("response1", "response2")):
        if a in value and b in value and "completions" not in value:
            value = {"completions": [value[a], value[b]]}
            break
    given = value.get("completions")
    if not isinstance(given, list) or len(given) < 2:
        raise DataError(
            where, "expected a list of at least 2 completions (or chosen/rejected)", "completions"
        )
    texts = []
    for i, c in enumerate(given):
        if isinstance(c, dict):
            c = next((c[k] for k in TEXT_KEYS if isinstance(c.get(k), str)), None)
        if not isinstance(c, str):
            raise DataError(
                where, f"completion {i}: expected text or an object with {'/'.join(TEXT_KEYS)}", "completions"
            )
        texts.append(c)
    return texts


def from_model(
    folder: Path, model: str, prompts, samples: int, max_new_tokens: int, seed: int, limit: int = 0
) -> tuple[list, dict]:
    """K samples of each prompt from a model or run (dpokit.load; sampled as the rounds sample, seeded),
    kept in FOLDER/samples.jsonl, as comparisons."""
    from dpokit.api import load
    from dpokit.data.prompts import load_prompts

    if samples < 2:
        raise DataError("--samples", f"{samples}: a comparison needs at least 2 samples per prompt")
    texts = load_prompts(prompts, None, limit)
    policy = load(model)
    drawn = policy.generate(texts, n=samples, max_new_tokens=max_new_tokens, seed=seed)
    records = [{"prompt": p, "completions": row, "model": model} for p, row in zip(texts, drawn, strict=True)]
    write_jsonl(folder / "samples.jsonl", records, atomic=True)
    items, identical = [], 0
    for i, rec in enumerate(records):
        found, same = pairs_of(rec["prompt"], rec["completions"], {"record": i})
        items += found
        identical += same
    return items, {"records": len(records), "identical": identical}
