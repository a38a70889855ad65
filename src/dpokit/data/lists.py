"""Rated lists: one prompt with several scored completions, as UltraFeedback publishes its raw data and as
people rate a model's samples, made into preference pairs.

Record shapes (detected by a `completions` list):
- UltraFeedback raw: `instruction` + `completions` of `{"response", "fine-grained_score", "overall_score",
  "annotations", ...}`; the score is `fine-grained_score` (the mean of the aspect ratings, as
  HuggingFaceH4's binarized UltraFeedback uses it), else `overall_score`;
- general: `prompt` (text or messages), `messages` or `instruction`, + `completions` of `{"text" |
  "response" | "content" | "completion": text or messages, "score" | "rating": number}`, or of plain texts
  with a parallel `scores` (or `ratings`) list.

Pairs (`data.list_pairs`): `best_vs_rest` (the default: the best completion against each one scored lower,
each pair of a list sharing its prompt: trained as one prompt with N branches), or `best_worst` (one pair,
the best against the worst). A list whose scores are all equal gives one tie (no preference: dropped
before training and counted). Each pair carries score_chosen / score_rejected, so data.min_score_gap
filters the close ones.
"""

from __future__ import annotations

import math
from typing import Any

from dpokit.data import messages as msgs
from dpokit.data.readers import DataError

TEXT_KEYS = ("response", "text", "content", "completion")
SCORE_KEYS = ("fine-grained_score", "overall_score", "score", "rating")


def rated_list(where: str, record: dict, rule: str = "best_vs_rest") -> list:
    """The pairs of one rated-list record (PreferenceExamples with the list's prompt)."""
    from dpokit.data.formats import PreferenceExample, _weight

    prompt = _prompt(where, record)
    scored = _scored(where, record)
    if len(scored) < 2:
        raise DataError(where, f"a rated list needs at least 2 completions, got {len(scored)}", "completions")
    order = sorted(range(len(scored)), key=lambda i: (-scored[i][1], i))  # best first, ties in list order
    best = order[0]
    worse = [i for i in order if scored[i][1] < scored[best][1]]
    weight = _weight(where, record)

    def pair(i: int, j: int, meta: dict | None = None):
        (c, sc), (r, sr) = scored[i], scored[j]
        return PreferenceExample(
            prompt,
            c,
            r,
            weight,
            where,
            "rated_list",
            {"score_chosen": sc, "score_rejected": sr, **(meta or {})},
        )

    if not worse:  # every completion scored the same: no preference
        return [pair(order[0], order[-1], {"tie": True})]
    if rule == "best_worst":
        return [pair(best, worse[-1])]
    return [pair(best, j) for j in worse]


def _prompt(where: str, record: dict):
    if isinstance(record.get("prompt"), list):
        return msgs.messages(where, record, "prompt")
    if "messages" in record:
        return msgs.messages(where, record, "messages")
    for key in ("prompt", "instruction"):
        if isinstance(record.get(key), str) and record[key].strip():
            return [{"role": "user", "content": record[key]}]
    raise DataError(where, "a rated list needs its prompt: prompt, messages or instruction", "prompt")


def _scored(where: str, record: dict) -> list[tuple[list, float]]:
    """(completion messages, score) of each completion of the list."""
    items = record["completions"]
    parallel = record.get("scores", record.get("ratings"))
    out = []
    for i, item in enumerate(items):
        key = f"completions[{i}]"
        if isinstance(item, dict):
            text_key = next((k for k in TEXT_KEYS if k in item), None)
            score_key = next((k for k in SCORE_KEYS if item.get(k) is not None), None)
            if text_key is None:
                raise DataError(where, f"no completion text ({' / '.join(TEXT_KEYS)}) in {sorted(item)}", key)
            text, score = item[text_key], item.get(score_key) if score_key else None
            if score is None and isinstance(parallel, list) and i < len(parallel):
                score = parallel[i]
        else:
            text, score = item, parallel[i] if isinstance(parallel, list) and i < len(parallel) else None
        out.append((msgs.answers(where, text, key), _number(where, score, f"{key}.score")))
    return out


def _number(where: str, value: Any, key: str) -> float:
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise DataError(where, f"expected a score, got {value!r}", key) from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DataError(
            where, f"expected a finite score ({' / '.join(SCORE_KEYS)}, or a scores list), got {value!r}", key
        )
    return float(value)
