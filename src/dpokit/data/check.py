"""`dpokit data check`: find the known DPO failure modes in a preference file before training.

Measures (all per pair, over the valid pairs):
- similarity: the Dice coefficient of the chosen and rejected token multisets,
  2 |C ∩ R| / (|C| + |R|) (1 = the same tokens, 0 = nothing shared). Tokens come from the model's
  tokenizer when one is given, else from words and punctuation (`\\w+|[^\\w\\s]`). Pairs above the
  threshold are too alike to carry much preference signal;
- length bias, either way: d = len(chosen) - len(rejected) in tokens; the share of pairs with d > 0, mean and
  median d, and the correlation of d with the preference: with score columns, Pearson's r between d and
  the score gap; without, the point-biserial r of (d, +1), (-d, -1) over both orderings of every pair,
  which is mean(d) / sqrt(mean(d^2));
- truncation under max_length / max_prompt_length (needs the tokenizer);
- annotator agreement (votes), annotator ties, score gaps and confidence when the data carries them;
- an empty file, and records of another format (the fields found against the formats expected).
"""

from __future__ import annotations

import bisect
import json
import math
import re
import statistics
import time
from collections import Counter

from dpokit.data import foreign_format_hint, normalize_records, resolve_data_path
from dpokit.data.formats import score_gap
from dpokit.data.readers import DataError, InMemory, read_records

WORD = re.compile(r"\w+|[^\w\s]")
SIMILARITY_BINS = (0.0, 0.25, 0.5, 0.75, 0.9, 0.95, 1.0)
LENGTH_BIAS_SHARE = 0.6
LENGTH_BIAS_R = 0.2


def text_of(value) -> str:
    return value if isinstance(value, str) else "\n".join(m["content"] for m in value)


def dice(a: list, b: list) -> float:
    if not a and not b:
        return 1.0
    common = sum((Counter(a) & Counter(b)).values())
    return 2 * common / (len(a) + len(b))


def tokenize_texts(texts: list[str], tokenizer) -> list[list]:
    if tokenizer is None:
        return [WORD.findall(t) for t in texts]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def _quantiles(values: list[float]) -> dict:
    if not values:
        return {}
    q = statistics.quantiles(values, n=20, method="inclusive") if len(values) > 1 else [values[0]] * 19
    return {
        "min": min(values),
        "p05": q[0],
        "p25": q[4],
        "median": q[9],
        "p75": q[14],
        "p95": q[18],
        "max": max(values),
    }


def _histogram(values: list[float], edges=SIMILARITY_BINS) -> dict:
    """Counts per bin [lo, hi); the last bin is closed so that 1.0 counts."""
    labels = [f"[{lo}, {hi})" for lo, hi in zip(edges, edges[1:], strict=False)]
    labels[-1] = labels[-1][:-1] + "]"
    counts = dict.fromkeys(labels, 0)
    for v in values:
        i = min(bisect.bisect_right(edges, v) - 1, len(labels) - 1)
        if i >= 0:
            counts[labels[i]] += 1
    return counts


def _read(path):
    """Normalized examples (paired, or unpaired when most records are completion/label ones), stats, and
    the fields-vs-formats hint when no record is usable."""
    records = list(read_records(path))
    unpaired = (
        sum(
            1
            for r in records
            if not isinstance(r, DataError)
            and isinstance(r.value, dict)
            and "label" in r.value
            and "chosen" not in r.value
        )
        > len(records) / 2
    )
    examples, errors, stats = normalize_records(records, unpaired)
    hint = foreign_format_hint(records, errors, unpaired) if errors and not examples else None
    return examples, stats, unpaired, hint


class DataReport(dict):
    """`dpokit data check`'s report: a JSON-ready dict (every measure by name, see the module docstring)
    with the main figures as attributes and its terminal rendering as `text()`."""

    @property
    def records(self) -> int:
        return self["records"]

    @property
    def valid(self) -> int:
        return self["valid"]

    @property
    def invalid(self) -> int:
        return self["invalid"]["count"]

    @property
    def advice(self) -> list[str]:
        """What to change, with the config keys, for every problem found (empty: nothing found)."""
        return self["advice"]

    @property
    def trainable(self) -> bool:
        """At least one usable record."""
        return self["valid"] > 0

    def text(self, width: int = 110) -> str:
        """The report as `dpokit data check` prints it."""
        import io

        from rich.console import Console

        from dpokit.data.report import render

        buffer = io.StringIO()
        render(self, Console(file=buffer, width=width, force_terminal=False, color_system=None))
        return buffer.getvalue()

    def __repr__(self) -> str:
        return f"DataReport({self['file']!r}: {self['valid']} of {self['records']} valid, {len(self['advice'])} advice)"


def check_file(
    spec,
    tokenizer=None,
    max_length: int | None = None,
    max_prompt_length: int | None = None,
    similarity_threshold: float = 0.9,
) -> DataReport:
    """The full report (see the module docstring for every measure) of a file or of records in memory
    (InMemory). Truncation is counted when a tokenizer and at least one of the two lengths are given (the
    other takes its default)."""
    started = time.perf_counter()
    path = spec if isinstance(spec, InMemory) else resolve_data_path(spec)
    examples, stats, unpaired, hint = _read(path)  # a missing file: the reader's "no such file"
    report = {
        "file": path.name if isinstance(path, InMemory) else str(path),
        "records": stats.records,
        "valid": stats.valid,
        "kind": "unpaired" if unpaired else "paired",
        "formats": dict(stats.formats),
        "invalid": {"count": stats.skipped, "reasons": dict(stats.skip_reasons), "first": stats.first_errors},
        "format_hint": hint,
        "empty_completions": sum(n for r, n in stats.skip_reasons.items() if "empty completion" in r),
    }
    prompts = Counter(json.dumps(e.prompt, ensure_ascii=False) for e in examples)
    report["repeated_prompts"] = {
        "prompts": sum(1 for c in prompts.values() if c > 1),
        "examples": sum(c for c in prompts.values() if c > 1),
    }
    report.update(conversation_stats(examples))
    if unpaired:
        report.update(_unpaired_stats(examples, tokenizer))
    else:
        report.update(_pair_stats(examples, tokenizer, similarity_threshold))
        if tokenizer is not None and (max_length or max_prompt_length):
            from dpokit.config import DataConfig

            lengths = (max_length or DataConfig.max_length, max_prompt_length or DataConfig.max_prompt_length)
            report["truncation"] = _truncation(examples, tokenizer, *lengths)
    if tokenizer is not None:
        from dpokit.tokenize import template_tool_problem

        report["template_problem"] = template_tool_problem(tokenizer, examples)
    report["advice"] = advice(report, similarity_threshold)
    report["seconds"] = time.perf_counter() - started
    return DataReport(report)


def weight_stats(examples) -> dict | None:
    """The per-pair `weight`s when any differs from 1 (they scale each pair's loss): count, min, max, mean."""
    weights = [e.weight for e in examples]
    if all(w == 1.0 for w in weights):
        return None
    return {
        "weighted": sum(1 for w in weights if w != 1.0),
        "of": len(weights),
        "min": min(weights),
        "max": max(weights),
        "mean": sum(weights) / len(weights),
    }


def conversation_stats(examples) -> dict:
    """Tool use, completions of several messages (and which of their tokens are trained) and weights."""
    from dpokit.data.messages import has_tools

    sides = [getattr(e, k) for e in examples for k in ("chosen", "rejected", "completion") if hasattr(e, k)]
    out = {
        "tools": {
            "records": sum(1 for e in examples if has_tools(e)),
            "tool_calls": sum(
                1 for s in sides if isinstance(s, list) and any(m.get("tool_calls") for m in s)
            ),
            "with_schemas": sum(1 for e in examples if e.tools),
        },
        "multi_message_completions": {
            "completions": sum(1 for s in sides if isinstance(s, list) and len(s) > 1),
            "trained": "assistant turns only (tool results and user turns are context; data.targets)",
        },
    }
    weights = weight_stats(examples)
    if weights:
        out["weights"] = weights
    return out


def _pair_stats(examples, tokenizer, threshold: float) -> dict:
    ties = [e for e in examples if e.meta.get("tie")]
    examples = [e for e in examples if not e.meta.get("tie")]
    keys = Counter(json.dumps([e.prompt, e.chosen, e.rejected], ensure_ascii=False) for e in examples)
    chosen = tokenize_texts([text_of(e.chosen) for e in examples], tokenizer)
    rejected = tokenize_texts([text_of(e.rejected) for e in examples], tokenizer)
    sims = [dice(c, r) for c, r in zip(chosen, rejected, strict=True)]
    diffs = [len(c) - len(r) for c, r in zip(chosen, rejected, strict=True)]
    out = {
        "ties": len(ties),
        "duplicate_pairs": sum(c - 1 for c in keys.values() if c > 1),
        "identical_pairs": sum(1 for e in examples if e.chosen == e.rejected),
        "similarity": {
            "measure": "Dice of token multisets: 2|C & R| / (|C| + |R|)",
            "quantiles": _quantiles(sims),
            "histogram": _histogram(sims),
            "threshold": threshold,
            "above_threshold": sum(1 for s in sims if s > threshold),
        },
        "length": _length_bias(examples, diffs),
    }
    out.update(_quality(examples))
    annotators = _annotators([*examples, *ties])
    if annotators:
        out["annotators"] = annotators
    return out


def _length_bias(examples, diffs: list[int]) -> dict:
    n = len(diffs)
    if n == 0:
        return {}
    gaps = [g for g in map(score_gap, (e.meta for e in examples)) if g is not None]
    if len(gaps) == n and n > 2 and statistics.pstdev(gaps) > 0 and statistics.pstdev(diffs) > 0:
        r, basis = statistics.correlation(diffs, gaps), "Pearson r(length difference, score gap)"
    else:
        mean_sq = sum(d * d for d in diffs) / n
        r = (sum(diffs) / n) / math.sqrt(mean_sq) if mean_sq else 0.0
        basis = "point-biserial r(length difference, preference) = mean(d) / sqrt(mean(d^2))"
    return {
        "chosen_longer_share": sum(1 for d in diffs if d > 0) / n,
        "equal_length_share": sum(1 for d in diffs if d == 0) / n,
        "mean_difference": sum(diffs) / n,
        "median_difference": statistics.median(diffs),
        "correlation": r,
        "correlation_basis": basis,
    }


def _annotators(examples) -> dict | None:
    """Named annotators' pairwise agreement (`dpokit label export --format votes`), ties included: for each
    two, the share of the pairs both voted on where they voted the same (1, 2 or 0)."""
    from dpokit.labels.results import agreement

    votes = [
        {"comparison": n, "annotator": who, "choice": str(vote)}
        for n, e in enumerate(examples)
        for who, vote in zip(e.meta.get("annotators") or [], e.meta.get("votes") or [], strict=False)
    ]
    return agreement(votes) if votes else None


def _quality(examples) -> dict:
    out = {}
    agreement = [e.meta["agreement"] for e in examples if "agreement" in e.meta]
    if agreement:
        out["agreement"] = {
            "distribution": {f"{a:.3f}": c for a, c in sorted(Counter(agreement).items())},
            "mean": sum(agreement) / len(agreement),
        }
    gaps = [g for g in map(score_gap, (e.meta for e in examples)) if g is not None]
    if gaps:
        out["score_gap"] = {"quantiles": _quantiles(gaps), "non_positive": sum(1 for g in gaps if g <= 0)}
    conf = [e.meta["confidence"] for e in examples if "confidence" in e.meta]
    if conf:
        out["confidence"] = {"quantiles": _quantiles(conf)}
    return out


def _unpaired_stats(examples, tokenizer) -> dict:
    lengths = tokenize_texts([text_of(e.completion) for e in examples], tokenizer)
    by_label = {True: [], False: []}
    for e, toks in zip(examples, lengths, strict=True):
        by_label[e.label].append(len(toks))
    keys = Counter(json.dumps([e.prompt, e.completion, e.label], ensure_ascii=False) for e in examples)
    return {
        "labels": {"desirable": len(by_label[True]), "undesirable": len(by_label[False])},
        "duplicate_examples": sum(c - 1 for c in keys.values() if c > 1),
        "length": {
            "desirable_median": statistics.median(by_label[True]) if by_label[True] else None,
            "undesirable_median": statistics.median(by_label[False]) if by_label[False] else None,
        },
    }


def _truncation(examples, tokenizer, max_length: int, max_prompt_length: int) -> dict:
    from dpokit.tokenize import tokenize_pairs

    _, stats = tokenize_pairs(examples, tokenizer, max_length, max_prompt_length, skip_invalid=True)
    return {"max_length": max_length, "max_prompt_length": max_prompt_length, **stats.to_dict()}


def advice(report: dict, threshold: float) -> list[str]:
    """What to change, with the config keys (or `data filter` flags), for every problem found."""
    tips = []
    if report["records"] == 0:
        tips.append("the file holds no records: nothing to train on")
    if report.get("format_hint"):
        tips.append(report["format_hint"])
    elif report["invalid"]["count"]:
        tips.append(
            f"{report['invalid']['count']} invalid records: fix them, or skip and count them "
            "(data.skip_invalid=true in training, --skip-invalid in dpokit data filter)"
        )
    if report.get("ties"):
        tips.append(
            f"{report['ties']} annotator ties carry no preference: training drops them (counted in "
            "data_stats.json), and so does dpokit data filter"
        )
    if report.get("identical_pairs"):
        tips.append(
            f"{report['identical_pairs']} pairs have chosen == rejected (no signal): data.drop_identical=true "
            "(the default) drops them"
        )
    if report.get("duplicate_pairs"):
        tips.append(
            f"{report['duplicate_pairs']} exact duplicate pairs: data.deduplicate=pairs (the default) drops "
            "them in training; dpokit data filter writes a file without them"
        )
    sim = report.get("similarity", {})
    if sim.get("above_threshold"):
        tips.append(
            f"{sim['above_threshold']} pairs are more than {threshold} similar: data.max_similarity={threshold} "
            "drops them"
        )
    tips += _length_advice(report.get("length", {}))
    if report.get("template_problem"):
        tips.append(report["template_problem"])
    if report.get("formats", {}).get("rated_list"):
        tips.append(
            f"{report['formats']['rated_list']} pairs come from rated lists (data.list_pairs): "
            "train.group_by_prompt=true trains each list as one prompt with its completions as branches"
        )
    if "agreement" in report and report["agreement"]["mean"] < 1:
        tips.append(
            "annotators disagree on some pairs: data.min_agreement=0.67 (or 1.0) keeps the confident ones"
        )
    if "score_gap" in report and report["score_gap"]["non_positive"]:
        tips.append(
            f"{report['score_gap']['non_positive']} pairs have score_chosen <= score_rejected: data.min_score_gap"
        )
    trunc = report.get("truncation")
    if trunc and (trunc["prompts_truncated"] or trunc["completions_truncated"] or trunc["dropped"]):
        tips.append(
            f"truncation: {trunc['prompts_truncated']} prompts and {trunc['completions_truncated']} completions "
            f"are cut, {sum(trunc['dropped'].values())} pairs lose their whole completion; raise "
            "data.max_length / data.max_prompt_length"
        )
    return tips


def _length_advice(length: dict) -> list[str]:
    """Length bias in either direction: DPO learns whatever length the chosen side has."""
    if "chosen_longer_share" not in length:  # no pairs, or unpaired data
        return []
    share, r = length["chosen_longer_share"], length["correlation"]
    fixes = "Use loss.type=sigmoid_norm, or loss.ld_alpha=0.5 (LD-DPO), or data.rebalance_length=true"
    if share > LENGTH_BIAS_SHARE or r > LENGTH_BIAS_R:
        return [
            f"length bias: chosen is longer in {share:.0%} of pairs (r = {r:+.2f}); DPO will learn to write "
            f"longer. {fixes}"
        ]
    shorter = 1 - share - length["equal_length_share"]
    if shorter > LENGTH_BIAS_SHARE or r < -LENGTH_BIAS_R:
        return [
            f"length bias: rejected is longer in {shorter:.0%} of pairs (r = {r:+.2f}); DPO will learn to write "
            f"shorter. {fixes}"
        ]
    return []
