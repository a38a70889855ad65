"""Filter preference pairs before training; every drop is counted by reason (nothing goes silently).

In order: annotator ties (no preference: always dropped), repeats (`deduplicate`: the same prompt, chosen
and rejected, or also the same prompt and chosen), chosen == rejected, pairs above a similarity threshold
(the Dice measure of `data check`), pairs below an annotator-agreement, score-gap or confidence threshold,
and length rebalancing: a seeded subsample that keeps as many chosen-longer as chosen-shorter pairs. The
defaults drop ties, exact duplicate pairs and identical pairs only.
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from dpokit.config import DataConfig
from dpokit.data.check import dice, text_of, tokenize_texts
from dpokit.data.formats import PreferenceExample

TIE = "annotator tie (no preference)"


def _key(e: PreferenceExample, fields: tuple[str, ...]) -> str:
    return json.dumps([getattr(e, f) for f in fields], ensure_ascii=False)


def drop_reason(e: PreferenceExample, s: DataConfig, seen: set, similarity: float | None) -> str | None:
    """Why the pair is dropped, or None to keep it. `seen` collects the repeat keys of kept pairs."""
    if e.meta.get("tie"):
        return TIE
    if s.deduplicate != "off":
        pair, prompt_chosen = _key(e, ("prompt", "chosen", "rejected")), _key(e, ("prompt", "chosen"))
        if pair in seen:
            return "duplicate pair"
        if s.deduplicate == "prompt_chosen" and prompt_chosen in seen:
            return "repeated prompt + chosen"
        seen.update((pair, prompt_chosen))
    if s.drop_identical and e.chosen == e.rejected:
        return "identical chosen and rejected"
    if similarity is not None and similarity > s.max_similarity:
        return f"similarity > {s.max_similarity}"
    if s.min_agreement is not None and e.meta.get("agreement", 1.0) < s.min_agreement:
        return f"agreement < {s.min_agreement}"
    if (
        s.min_score_gap is not None
        and "score_chosen" in e.meta
        and (e.meta["score_chosen"] - e.meta.get("score_rejected", 0.0) < s.min_score_gap)
    ):
        return f"score gap < {s.min_score_gap}"
    if s.min_confidence is not None and e.meta.get("confidence", 1.0) < s.min_confidence:
        return f"confidence < {s.min_confidence}"
    return None


def filter_pairs(
    examples: list[PreferenceExample],
    settings: DataConfig | None = None,
    tokenizer=None,
    seed: int = 0,
    **overrides,
) -> tuple[list[PreferenceExample], Counter]:
    """Return (kept examples in their original order, drop counts by reason). The filters are the `data.*`
    keys of `settings` (defaults: DataConfig's); keyword `overrides` replace some of them
    (`filter_pairs(examples, min_score_gap=1.0)`)."""
    s = dataclasses.replace(settings or DataConfig(), **overrides)
    need_tokens = s.max_similarity < 1.0 or s.rebalance_length
    chosen = tokenize_texts([text_of(e.chosen) for e in examples], tokenizer) if need_tokens else None
    rejected = tokenize_texts([text_of(e.rejected) for e in examples], tokenizer) if need_tokens else None
    dropped: Counter = Counter()
    kept, seen = [], set()
    for i, e in enumerate(examples):
        similarity = dice(chosen[i], rejected[i]) if s.max_similarity < 1.0 else None
        reason = drop_reason(e, s, seen, similarity)
        if reason:
            dropped[reason] += 1
        else:
            kept.append(i)
    if s.rebalance_length:
        longer = [i for i in kept if len(chosen[i]) > len(rejected[i])]
        shorter = [i for i in kept if len(chosen[i]) < len(rejected[i])]
        excess, keep_n = (longer, len(shorter)) if len(longer) > len(shorter) else (shorter, len(longer))
        removed = set(random.Random(seed).sample(excess, len(excess) - keep_n))
        if removed:
            dropped["length rebalancing"] += len(removed)
            kept = [i for i in kept if i not in removed]
    return [examples[i] for i in kept], dropped


def record_of(e: PreferenceExample) -> dict:
    """A normalized pair as a record any dpokit reader takes back as the same pair: prompt, chosen and
    rejected (text or messages with their tool calls), weight, tools, scores, votes' agreement, margin."""
    row = {
        "prompt": e.prompt,
        "chosen": e.chosen,
        "rejected": e.rejected,
        **({"weight": e.weight} if e.weight != 1 else {}),
        **({"tools": e.tools} if e.tools else {}),  # tool calls and results ride in the messages
    }
    kept = ("score_chosen", "score_rejected", "confidence", "agreement", "margin")
    row.update({k: v for k, v in e.meta.items() if k in kept})
    return row


def split_file(
    spec,
    out: Path,
    fractions: dict[str, float],
    seed: int = 0,
    skip_invalid: bool = False,
    chat: bool = False,
) -> dict:
    """`dpokit data split`: the pairs of `spec` in parts by prompt (no prompt in two parts), each written
    to OUT/NAME.jsonl as records; `chat`: Anthropic HH transcripts written as chat messages (a chat model's
    template then frames them). Returns {name: (prompts, pairs)}."""
    from dpokit.data import load_examples, prompt_key, split_parts
    from dpokit.files import write_jsonl

    examples, _ = load_examples(spec, skip_invalid, skip_hint="--skip-invalid")
    Path(out).mkdir(parents=True, exist_ok=True)
    counts = {}
    for name, part in split_parts(examples, fractions, seed).items():
        rows = [record_of(e) for e in part]
        write_jsonl(Path(out) / f"{name}.jsonl", [as_chat(row) for row in rows] if chat else rows)
        counts[name] = (len({prompt_key(e) for e in part}), len(part))
    return counts


def as_chat(row: dict) -> dict:
    """A record whose prompt is an Anthropic HH transcript, with the prompt as chat messages and each
    completion as the assistant's answer (stripped); other records as they are."""
    from dpokit.data.messages import transcript_messages

    turns = transcript_messages(row["prompt"]) if isinstance(row["prompt"], str) else None
    if turns is None or turns[-1]["role"] != "user":
        return row
    answers = {k: row[k].strip() if isinstance(row[k], str) else row[k] for k in ("chosen", "rejected")}
    return {**row, "prompt": turns, **answers}


@dataclass
class FilterResult:
    records: int
    """Records read."""
    kept: int
    dropped: Counter = field(default_factory=Counter)
    """Every record not kept, by reason: invalid records (skipped) and filtered pairs."""
    rows: list[dict] = field(default_factory=list, repr=False)
    """The kept pairs as records (standard or message format, with their weight, scores and votes)."""


def filter_records(spec, settings: DataConfig, tokenizer=None, seed: int = 0) -> FilterResult:
    """`dpokit data filter`: the kept pairs of a file (or of records in memory: InMemory) as records; every
    record is kept or counted by reason."""
    from dpokit.data import load_examples

    examples, stats = load_examples(
        spec, settings.skip_invalid, skip_hint="--skip-invalid", list_pairs=settings.list_pairs
    )
    kept, dropped = filter_pairs(examples, settings, tokenizer, seed)
    rows = [record_of(e) for e in kept]
    return FilterResult(
        stats.records,
        len(kept),
        Counter({**{f"invalid: {r}": n for r, n in stats.skip_reasons.items()}, **dropped}),
        rows,
    )


def filter_file(spec, out: Path, settings: DataConfig, tokenizer=None, seed: int = 0) -> FilterResult:
    """filter_records, written to `out` (JSONL)."""
    from dpokit.files import write_jsonl

    result = filter_records(spec, settings, tokenizer, seed)
    write_jsonl(out, result.rows)
    return result
