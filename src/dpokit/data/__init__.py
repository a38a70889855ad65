"""Preference data: read files, normalize records, count what is skipped, split train/eval."""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from dpokit.data.formats import (
    PreferenceExample,
    UnpairedExample,
    normalize_pairs,
    normalize_unpaired,
    split_implicit_prompt,
)
from dpokit.data.readers import DataError, InMemory, RawRecord, in_memory, read_records

__all__ = [
    "FORMATS",
    "DataError",
    "InMemory",
    "LoadStats",
    "PreferenceExample",
    "UnpairedExample",
    "in_memory",
    "load_examples",
    "normalize_records",
    "reason_of",
    "resolve_data_path",
    "split_by_prompt",
    "split_parts",
    "split_implicit_prompt",
]

log = logging.getLogger(__name__)
MAX_LISTED_ERRORS = 20


@dataclass
class LoadStats:
    records: int = 0
    valid: int = 0
    skipped: int = 0
    formats: Counter = field(default_factory=Counter)
    skip_reasons: Counter = field(default_factory=Counter)
    first_errors: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "records": self.records,
            "valid": self.valid,
            "skipped": self.skipped,
            "formats": dict(self.formats),
            "skip_reasons": dict(self.skip_reasons),
            "first_errors": self.first_errors,
        }


FILE_SUFFIXES = (".json", ".jsonl", ".gz", ".parquet", ".csv")
"""A missing path ending so is a missing file, not a hub dataset id."""


def resolve_data_path(spec: str, kind: str = "prefs") -> Path:
    """`builtin:NAME` -> the file dpokit/assets/NAME_{kind}.jsonl (kind: prefs, prompts); else a path."""
    if spec.startswith("builtin:"):
        name = spec.split(":", 1)[1]
        assets = Path(str(resources.files("dpokit") / "assets"))
        path = assets / f"{name}_{kind}.jsonl"
        if not path.exists():
            known = sorted(
                "builtin:" + p.name.removesuffix(f"_{kind}.jsonl") for p in assets.glob(f"*_{kind}.jsonl")
            )
            raise DataError(spec, f"unknown builtin {kind} file; available: {', '.join(known)}")
        return path
    return Path(spec)


FORMATS = {
    False: "prompt/chosen/rejected; chosen/rejected full texts (implicit prompt); message lists "
    "(prompt + chosen/rejected, messages + chosen/rejected, or chosen_messages/rejected_messages); "
    "conversations + chosen/rejected (ShareGPT); instruction/response1/response2 + annotator votes; rated "
    "lists (prompt/instruction + completions with scores)",
    True: "prompt/completion/label, or messages + label",
}
"""What each kind of data file may hold (unpaired: KTO), for messages about records of another format."""


def load_examples(
    spec: str | InMemory,
    skip_invalid: bool = False,
    unpaired: bool = False,
    key: str = "",
    skip_hint: str = "data.skip_invalid=true",
    list_pairs: str = "best_vs_rest",
) -> tuple[list[PreferenceExample] | list[UnpairedExample], LoadStats]:
    """Read and normalize every record of a preference file (`unpaired`: prompt/completion/label records).

    Invalid records raise one DataError listing the first problems (file:line: field: what), unless
    `skip_invalid`, in which case they are skipped and counted by reason in the returned stats. `key` names
    where the file was given (data.train, --data) and `skip_hint` how to skip invalid records, in messages.
    `spec` may be records in memory (InMemory), named in messages by their name; `list_pairs`: how rated
    lists become pairs (data/lists.py).
    """
    path = spec if isinstance(spec, InMemory) else resolve_data_path(spec)
    if not isinstance(path, InMemory) and not path.exists():
        from dpokit.hub import DATASET_ID, dataset_records

        file_like = str(spec).startswith((".", "/", "~")) or Path(str(spec)).suffix.lower() in FILE_SUFFIXES
        if file_like or not DATASET_ID.match(str(spec)):
            raise DataError(str(path), "no such file" + (f" (given as {key})" if key else ""))
        path = dataset_records(str(spec), key or "data", "test" if key == "data.eval" else "train")
    records = list(read_records(path))
    path = path.name if isinstance(path, InMemory) else path
    examples, errors, stats = normalize_records(records, unpaired, list_pairs)
    if stats.records == 0:
        raise DataError(str(path), "no records in the file" + (f" (given as {key})" if key else ""))
    if not examples and errors:
        hint = foreign_format_hint(records, errors, unpaired)
        if hint:
            raise DataError(str(path), hint)
    if errors and not skip_invalid:
        listed = "\n".join(f"  {e}" for e in errors[:MAX_LISTED_ERRORS])
        more = (
            f"\n  ... and {len(errors) - MAX_LISTED_ERRORS} more" if len(errors) > MAX_LISTED_ERRORS else ""
        )
        raise DataError(
            str(path),
            f"{len(errors)} invalid record(s) of {stats.records}:\n{listed}{more}\n"
            f"Fix the records, or set {skip_hint} to skip and count them.",
        )
    if errors:
        log.warning("%s: skipped %d invalid record(s): %s", path, len(errors), dict(stats.skip_reasons))
    if not examples:
        raise DataError(str(path), "no usable preference pairs in the file")
    return examples, stats


KNOWN_FIELDS = {
    "prompt",
    "completions",
    "chosen",
    "rejected",
    "conversations",
    "chosen_messages",
    "rejected_messages",
    "response1",
    "response2",
    "instruction",
    "completion",
    "label",
    "messages",
}


def foreign_format_hint(records: list, errors: list[DataError], unpaired: bool) -> str | None:
    """When no record holds any field of a known format: the fields found and the formats expected."""
    found = sorted(
        {k for r in records if isinstance(r, RawRecord) and isinstance(r.value, dict) for k in r.value}
    )
    if not found or KNOWN_FIELDS & set(found):
        return None
    return (
        f"none of the {len(records)} records has the fields of a known format: found fields {found}; "
        f"expected {FORMATS[unpaired]}"
    )


def normalize_records(
    records, unpaired: bool = False, list_pairs: str = "best_vs_rest"
) -> tuple[list, list[DataError], LoadStats]:
    """Normalize raw records (and DataErrors from the reader) into examples (a rated list gives several:
    `list_pairs`); errors are kept and counted."""
    stats = LoadStats()
    examples, errors = [], []
    for item in records:
        stats.records += 1
        try:
            if isinstance(item, DataError):
                raise item
            got = (
                [normalize_unpaired(item.where, item.value)]
                if unpaired
                else normalize_pairs(item.where, item.value, list_pairs)
            )
        except DataError as err:
            errors.append(err)
            stats.skipped += 1
            stats.skip_reasons[reason_of(err)] += 1
            if len(stats.first_errors) < MAX_LISTED_ERRORS:
                stats.first_errors.append(str(err))
            continue
        stats.valid += 1
        for example in got:
            stats.formats[example.format] += 1
        examples += got
    return examples, errors, stats


def reason_of(err: DataError) -> str:
    """A record error without its location: `field: what`, the key used to count skips by reason."""
    field_name = (err.field or "record").split("[")[0]
    msg = err.message.split(" (")[0].split(";")[0]
    return f"{field_name}: {msg}"[:80]


def prompt_key(example: PreferenceExample | UnpairedExample) -> str:
    return hashlib.sha1(json.dumps(example.prompt, ensure_ascii=False).encode()).hexdigest()


def split_parts(examples: list, fractions: dict[str, float], seed: int = 0) -> dict[str, list]:
    """The examples in named parts of about `fractions` of the distinct prompts each (all the pairs of a
    prompt in one part), by the same seeded prompt ranking as split_by_prompt."""
    keys = sorted(
        {prompt_key(e) for e in examples}, key=lambda k: hashlib.sha1(f"{seed}:{k}".encode()).digest()
    )
    total, part_of, start = sum(fractions.values()), {}, 0.0
    for name, share in fractions.items():
        end = start + share / total
        for k in keys[round(start * len(keys)) : round(end * len(keys))]:
            part_of[k] = name
        start = end
    parts: dict[str, list] = {name: [] for name in fractions}
    for e in examples:
        parts[part_of[prompt_key(e)]].append(e)
    return parts


def split_by_prompt(examples: list, fraction: float, seed: int) -> tuple[list, list]:
    """Hold out `fraction` of the distinct prompts (all their pairs), so no prompt is on both sides."""
    if fraction <= 0:
        return examples, []
    # Rank prompts by a seeded hash: deterministic across runs and machines, independent of file order.
    keys = sorted(
        {prompt_key(e) for e in examples}, key=lambda k: hashlib.sha1(f"{seed}:{k}".encode()).digest()
    )
    n_eval = max(1, round(fraction * len(keys)))
    held = set(keys[:n_eval])
    train = [e for e in examples if prompt_key(e) not in held]
    evals = [e for e in examples if prompt_key(e) in held]
    if not train:
        raise DataError(
            "data.eval_fraction", f"holding out {fraction} of the prompts leaves no training pairs"
        )
    return train, evals
