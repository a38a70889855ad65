"""What the votes say: progress, per-annotator counts, agreement between annotators, and the exports that
dpokit trains on (preference pairs; votes with one field per annotator, for data.min_agreement)."""

from __future__ import annotations

from collections import Counter, defaultdict
from itertools import combinations
from pathlib import Path

from dpokit.files import write_jsonl
from dpokit.labels.store import Store

FORMATS = ("pairs", "votes")
VOTE_CODE = {"a": 1, "b": 2, "tie": 0, "both_bad": 0}
"""The votes format's codes (PandaLM's): 1 = response1 better, 2 = response2 better, 0 = no preference."""


def labels_by_comparison(votes: list[dict]) -> dict[int, dict[str, str]]:
    """{comparison: {annotator: choice}} of the votes that carry a label (skips left out)."""
    out: dict[int, dict[str, str]] = defaultdict(dict)
    for v in votes:
        if v["choice"] != "skip":
            out[v["comparison"]][v["annotator"]] = v["choice"]
    return out


def agreement(votes: list[dict]) -> dict:
    """Pairwise agreement: for each two annotators, the share of the comparisons both labeled on which they
    gave the same label (a, b, tie, both bad); and for each annotator, that share over every other annotator
    they share comparisons with."""
    pairs: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
    for labels in labels_by_comparison(votes).values():
        for x, y in combinations(sorted(labels), 2):
            pairs[x, y][0] += labels[x] == labels[y]
            pairs[x, y][1] += 1
    per: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for (x, y), (same, shared) in pairs.items():
        for who in (x, y):
            per[who][0] += same
            per[who][1] += shared
    return {
        "pairs": [
            {"annotators": [x, y], "shared": n, "agreement": same / n}
            for (x, y), (same, n) in sorted(pairs.items())
        ],
        "annotators": {who: {"shared": n, "agreement": same / n} for who, (same, n) in sorted(per.items())},
    }


def stats(store: Store) -> dict:
    """Progress (comparisons, complete ones, votes), each annotator's counts by choice, and agreement."""
    votes = store.votes()
    per: dict[str, Counter] = defaultdict(Counter)
    for v in votes:
        per[v["annotator"]][v["choice"]] += 1
    total = len(store.comparisons())
    return {
        "comparisons": total,
        "overlap": store.overlap,
        "complete": total - store.open_count(),
        "votes": len(votes),
        "annotators": {who: {"votes": sum(c.values()), **dict(c)} for who, c in sorted(per.items())},
        "agreement": agreement(votes),
    }


def outcome(labels: dict[str, str]) -> str:
    """A comparison's label over its annotators: the strict majority (a, b, tie, both_bad), else
    no_majority; unlabeled when nobody labeled it."""
    if not labels:
        return "unlabeled"
    counts = Counter(labels.values()).most_common()
    if len(counts) > 1 and counts[0][1] == counts[1][1]:
        return "no_majority"
    return counts[0][0]


def export(store: Store, out: Path, fmt: str = "pairs") -> dict:
    """Write the labels as a JSONL file dpokit reads; returns the counts.

    pairs: prompt / chosen / rejected for each comparison whose majority prefers one completion (ties,
    both bad, no majority and unlabeled comparisons are left out, counted). votes: prompt, response1 (a),
    response2 (b) and annotator1..N (1, 2, 0 = tie or both bad; skips are not votes) with annotator_names:
    dpokit's votes format, so data.min_agreement and `dpokit data check` see the annotators' agreement."""
    labelled = labels_by_comparison(store.votes())
    records, counts = [], Counter()
    for c in store.comparisons():
        labels = labelled.get(c.id, {})
        result = outcome(labels)
        counts[result] += 1
        if fmt == "votes" and labels:
            names = sorted(labels)
            record = {"prompt": c.prompt, "response1": c.a, "response2": c.b}
            record.update({f"annotator{i + 1}": VOTE_CODE[labels[n]] for i, n in enumerate(names)})
            records.append({**record, "annotator_names": names})
        elif fmt == "pairs" and result in ("a", "b"):
            chosen, rejected = (c.a, c.b) if result == "a" else (c.b, c.a)
            records.append({"prompt": c.prompt, "chosen": chosen, "rejected": rejected})
    write_jsonl(out, records, atomic=True)
    return {
        "written": len(records),
        **{k: counts[k] for k in ("a", "b", "tie", "both_bad", "no_majority", "unlabeled")},
    }
