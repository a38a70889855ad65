"""Filter preference pairs before training; every drop is counted by reason (nothing goes silently).

Filters (all off unless set, except dropping chosen == rejected pairs, which carry no signal):
identical pairs, pairs above a similarity threshold (the Dice measure of `data.check`), pairs below an
annotator-agreement, score-gap or confidence threshold, and length rebalancing: a seeded subsample that
keeps as many chosen-longer as chosen-shorter pairs.
"""

from __future__ import annotations

import random
from collections import Counter

from dpokit.data.check import _tokenize_texts, dice, text_of
from dpokit.data.formats import PreferenceExample


def filter_pairs(
    examples: list[PreferenceExample],
    *,
    drop_identical: bool = True,
    max_similarity: float = 1.0,
    min_agreement: float | None = None,
    min_score_gap: float | None = None,
    min_confidence: float | None = None,
    rebalance_length: bool = False,
    tokenizer=None,
    seed: int = 0,
) -> tuple[list[PreferenceExample], Counter]:
    """Return (kept examples in their original order, drop counts by reason)."""
    dropped: Counter = Counter()
    need_tokens = max_similarity < 1.0 or rebalance_length
    chosen = _tokenize_texts([text_of(e.chosen) for e in examples], tokenizer) if need_tokens else None
    rejected = _tokenize_texts([text_of(e.rejected) for e in examples], tokenizer) if need_tokens else None
    kept = []
    for i, e in enumerate(examples):
        reason = None
        if drop_identical and e.chosen == e.rejected:
            reason = "identical chosen and rejected"
        elif max_similarity < 1.0 and dice(chosen[i], rejected[i]) > max_similarity:
            reason = f"similarity > {max_similarity}"
        elif min_agreement is not None and e.meta.get("agreement", 1.0) < min_agreement:
            reason = f"agreement < {min_agreement}"
        elif min_score_gap is not None and "score_chosen" in e.meta and (
            e.meta["score_chosen"] - e.meta.get("score_rejected", 0.0) < min_score_gap
        ):
            reason = f"score gap < {min_score_gap}"
        elif min_confidence is not None and e.meta.get("confidence", 1.0) < min_confidence:
            reason = f"confidence < {min_confidence}"
        if reason:
            dropped[reason] += 1
        else:
            kept.append(i)
    if rebalance_length:
        longer = [i for i in kept if len(chosen[i]) > len(rejected[i])]
        shorter = [i for i in kept if len(chosen[i]) < len(rejected[i])]
        excess, keep_n = (longer, len(shorter)) if len(longer) > len(shorter) else (shorter, len(longer))
        removed = set(random.Random(seed).sample(excess, len(excess) - keep_n))
        if removed:
            dropped["length rebalancing"] += len(removed)
            kept = [i for i in kept if i not in removed]
    return [examples[i] for i in kept], dropped
