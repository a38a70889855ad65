"""From the data section of a config to tokenized train and eval examples: read, limit and split by prompt
(`read_splits`, before any model is loaded), then filter (pairs), tokenize and truncate (`prepare_data`). Nothing is written here: every skip, drop and cut is counted in the
returned stats (the run writes them to RUN_DIR/data_stats.json), and a cut share worth knowing is said."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from dpokit.config import Config
from dpokit.data import DataError, InMemory, load_examples, split_by_prompt
from dpokit.data.check import weight_stats
from dpokit.data.filters import filter_pairs
from dpokit.data.formats import score_gap
from dpokit.data.tokcache import tokenize_pairs_cached
from dpokit.losses import LOSSES
from dpokit.tokenize import TokenizeStats, tokenize_pairs, tokenize_unpaired

log = logging.getLogger(__name__)
TRUNCATION_NOTICE = 0.02
"""Say it on the console when more than this share of a split's prompts or completions are cut."""


@dataclass
class PreparedData:
    train: list
    """TokenizedPair (or TokenizedUnpaired for KTO) of the training split."""
    eval: list
    stats: dict = field(default_factory=dict)
    """What data_stats.json holds: records read and skipped, filtered by reason, tokenized and truncated."""


@dataclass
class Splits:
    """Validated examples of the train and eval splits, read before any model is loaded."""

    train: list
    eval: list
    stats: dict


def read_splits(cfg: Config, unpaired: bool = False, given: dict[str, InMemory] | None = None) -> Splits:
    """Read and validate the data files, apply data.limit and hold out the eval prompts (cheap: no
    tokenizer), so that bad data stops a run before a model is loaded or converted. `given`: records in
    memory for `train` and/or `eval`, read instead of the files the config names."""
    d, given = cfg.data, given or {}
    train = given.get("train", d.train)
    examples, load_stats = load_examples(
        train, d.skip_invalid, unpaired, key="data.train", list_pairs=d.list_pairs
    )
    if d.limit:
        examples = examples[: d.limit]
    stats = {"train_file": load_stats.to_dict()}
    if d.eval or "eval" in given:
        evals = given.get("eval", d.eval)
        eval_examples, eval_stats = load_examples(
            evals, d.skip_invalid, unpaired, key="data.eval", list_pairs=d.list_pairs
        )
        stats["eval_file"] = eval_stats.to_dict()
    else:
        examples, eval_examples = split_by_prompt(examples, d.eval_fraction, cfg.train.seed)
    if not unpaired:
        check_scores(cfg.loss.type, examples + eval_examples)
    return Splits(examples, eval_examples, stats)


def check_scores(loss_types: list[str], examples: list) -> None:
    """A loss that regresses on reward scores (REBEL) needs score_chosen and score_rejected on every pair."""
    needs = [n for n in loss_types if n in LOSSES and LOSSES[n].needs_scores]
    for e in examples if needs else []:
        if score_gap(e.meta) is None:
            raise DataError(
                e.where,
                f"missing: loss.type {needs[0]} regresses on each pair's score gap (score_chosen - "
                "score_rejected); rated lists and dpokit iterate's pairs carry both",
                "score_chosen" if "score_chosen" not in e.meta else "score_rejected",
            )


def prepare_data(
    cfg: Config, tokenizer, unpaired: bool, splits: Splits, cache: Path | None = None
) -> PreparedData:
    """Filter (pairs) and tokenize the splits (read_splits). `cache`: a folder of tokenized pairs
    (tokcache.py) used when data.tokenized_cache is on."""
    d = cfg.data
    examples, eval_examples, stats = splits.train, splits.eval, dict(splits.stats)
    if not unpaired:
        filtered = {}
        examples, filtered["train"] = filter_pairs(examples, d, tokenizer, cfg.train.seed)
        # length rebalancing shapes what is learned; held-out pairs stay as they are
        eval_examples, filtered["eval"] = filter_pairs(eval_examples, d, tokenizer, rebalance_length=False)
        for name, dropped in filtered.items():
            if dropped:
                log.warning("%s: filtered out %d pairs (%s)", name, sum(dropped.values()), dict(dropped))
        stats["filtered"] = {k: dict(v) for k, v in filtered.items()}
    tokenize = tokenize_unpaired if unpaired else tokenize_pairs
    if cache is not None and d.tokenized_cache and not unpaired:
        tokenize = partial(tokenize_pairs_cached, root=cache)
    lengths = (d.max_length, d.max_prompt_length, d.skip_invalid, d.targets)
    train, tstats = tokenize(examples, tokenizer, *lengths)
    evals, estats = tokenize(eval_examples, tokenizer, *lengths)
    stats.update(train_tokenized=tstats.to_dict(), eval_tokenized=estats.to_dict())
    for name, s in (("train", tstats), ("eval", estats)):
        if s.dropped:
            log.warning("%s: dropped %s pairs (%s)", name, sum(s.dropped.values()), dict(s.dropped))
        notice = truncation_notice(name, s, cfg)
        if notice:
            log.warning(notice)
    if not train:
        lost = {**stats.get("filtered", {}).get("train", {}), **dict(tstats.dropped)}
        raise DataError(
            d.train, f"no training pairs left after filtering, tokenization and truncation (dropped: {lost})"
        )
    log.info("data: %d train pairs, %d eval pairs", len(train), len(evals))
    listed = sum(1 for e in examples if e.format == "rated_list")
    if listed and not cfg.train.group_by_prompt:
        log.info(
            "%d training pairs come from rated lists: train.group_by_prompt=true trains each list's pairs "
            "together, its prompt computed once (1 prompt + N branches)",
            listed,
        )
    weights = weight_stats(examples)
    if weights:  # they scale each pair's loss: say so where the data is reported
        stats["weights"] = weights
        log.info(
            "weights in use: %d of %d training pairs weigh != 1 (min %g, max %g, mean %.3f)",
            weights["weighted"],
            weights["of"],
            weights["min"],
            weights["max"],
            weights["mean"],
        )
    return PreparedData(train, evals, stats)


def truncation_notice(split: str, s: TokenizeStats, cfg: Config) -> str | None:
    """A console line when more than TRUNCATION_NOTICE of the split's pairs lose tokens."""
    if not s.pairs:
        return None
    parts = []
    if s.prompts_truncated / s.pairs > TRUNCATION_NOTICE:
        parts.append(
            f"{s.prompts_truncated} of {s.pairs} prompts were cut to data.max_prompt_length="
            f"{cfg.data.max_prompt_length} tokens (their start is dropped)"
        )
    if s.completions_truncated / s.pairs > TRUNCATION_NOTICE:
        parts.append(
            f"{s.completions_truncated} of {s.pairs} pairs had a completion cut to fit data.max_length="
            f"{cfg.data.max_length}"
        )
    if not parts:
        return None
    return (
        f"{split}: {'; '.join(parts)}. Raise the limits if the cut text matters (dpokit data check --model "
        f"{cfg.model.name} counts it per file)"
    )
