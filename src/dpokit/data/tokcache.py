"""Tokenized pairs kept on disk, so a second run on the same data skips tokenization (25 s at 100K HH pairs
on 2 cores, docs/performance.md).

The key covers everything that decides the token ids: the pairs themselves (prompt, chosen, rejected,
weight, where, in order, after filtering), the tokenizer (its serialized model, chat template and special
tokens), max_length / max_prompt_length / skip_invalid, and the source of dpokit's tokenize.py (a change
there is a new key, never a stale hit). On disk: ROOT/<key>/pairs.npz (token ids as flat int32 arrays with
their lengths, weights), where.json and stats.json, written to a temp folder and renamed: whole or absent.
"""

from __future__ import annotations

import hashlib
import inspect
import itertools
import json
import math
from collections import Counter
from pathlib import Path

import numpy as np

from dpokit import tokenize
from dpokit.files import build_folder
from dpokit.tokenize import TokenizedPair, TokenizeStats

CACHE_VERSION = "1"


def tokenizer_fingerprint(tokenizer) -> str:
    h = hashlib.blake2b(digest_size=16)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update(
        (backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))).encode()
    )
    h.update(repr((type(tokenizer).__name__, tokenizer.chat_template, tokenizer.all_special_tokens)).encode())
    h.update(repr((tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)).encode())
    return h.hexdigest()


def cache_key(
    examples: list, tokenizer, max_length: int, max_prompt_length: int, skip_invalid: bool, targets: str
) -> str:
    h = hashlib.sha256()
    h.update(repr((CACHE_VERSION, max_length, max_prompt_length, skip_invalid, targets)).encode())
    h.update(tokenizer_fingerprint(tokenizer).encode())
    h.update(inspect.getsource(tokenize).encode())
    for e in examples:
        scores = tuple(e.meta.get(k) for k in ("margin", "score_chosen", "score_rejected"))
        h.update(repr((e.prompt, e.chosen, e.rejected, e.weight, e.where, e.tools, scores)).encode())
    return h.hexdigest()[:24]


def load(folder: Path) -> tuple[list[TokenizedPair], TokenizeStats] | None:
    if not (folder / "stats.json").is_file():
        return None
    arrays = np.load(folder / "pairs.npz", allow_pickle=False)
    where = json.loads((folder / "where.json").read_text())
    ids, lengths, weights = arrays["ids"], arrays["lengths"].tolist(), arrays["weights"].tolist()
    margins = arrays["margins"].tolist() if "margins" in arrays else [0.0] * len(lengths)
    gaps = arrays["score_gaps"].tolist() if "score_gaps" in arrays else [math.nan] * len(lengths)
    scored = json.loads((folder / "targets.json").read_text()) if (folder / "targets.json").is_file() else {}
    pairs, start = [], 0
    # each pair's slices of the int32 array to lists: no list of every id at once (100K HH pairs: 1.8 s and
    # 0.81 GiB peak against 2.3-2.6 s and 0.89 GiB)
    for (p, c, r), w, loc, margin, gap in zip(lengths, weights, where, margins, gaps, strict=True):
        a, b, e = start + p, start + p + c, start + p + c + r
        masks = scored.get(str(len(pairs)), [None, None])
        pairs.append(
            TokenizedPair(
                ids[start:a].tolist(),
                ids[a:b].tolist(),
                ids[b:e].tolist(),
                w,
                loc,
                *(None if m is None else tuple(bool(x) for x in m) for m in masks),
                margin,
                None if math.isnan(gap) else gap,  # NaN stands for a pair without scores
            )
        )
        start = e
    raw = json.loads((folder / "stats.json").read_text())
    stats = TokenizeStats(**{**raw, "dropped": Counter(raw["dropped"])})
    return pairs, stats


def save(folder: Path, pairs: list[TokenizedPair], stats: TokenizeStats) -> None:
    def build(tmp: Path) -> None:
        lengths = [(len(p.prompt_ids), len(p.chosen_ids), len(p.rejected_ids)) for p in pairs]
        # straight into an int32 array: a Python list of every id would cost ~36 bytes per token (1.5 GiB of
        # peak RSS at 100K HH pairs)
        ids = np.fromiter(
            itertools.chain.from_iterable(
                itertools.chain(p.prompt_ids, p.chosen_ids, p.rejected_ids) for p in pairs
            ),
            dtype=np.int32,
            count=sum(map(sum, lengths)),
        )
        np.savez(
            tmp / "pairs.npz",
            ids=ids,
            lengths=np.asarray(lengths, dtype=np.int32).reshape(-1, 3),
            weights=np.asarray([p.weight for p in pairs], dtype=np.float64),
            margins=np.asarray([p.margin for p in pairs], dtype=np.float64),
            score_gaps=np.asarray(
                [math.nan if p.score_gap is None else p.score_gap for p in pairs], dtype=np.float64
            ),
        )
        (tmp / "where.json").write_text(json.dumps([p.where for p in pairs]))
        scored = {  # the trained-token masks of completions of several turns (most pairs have none)
            str(i): [
                None if m is None else [int(x) for x in m] for m in (p.chosen_targets, p.rejected_targets)
            ]
            for i, p in enumerate(pairs)
            if p.chosen_targets is not None or p.rejected_targets is not None
        }
        if scored:
            (tmp / "targets.json").write_text(json.dumps(scored))
        (tmp / "stats.json").write_text(json.dumps({**stats.__dict__, "dropped": dict(stats.dropped)}))

    build_folder(folder, build, "stats.json")


def tokenize_pairs_cached(
    examples: list,
    tokenizer,
    max_length: int,
    max_prompt_length: int,
    skip_invalid: bool,
    targets: str = "assistant",
    *,
    root: Path,
) -> tuple[list[TokenizedPair], TokenizeStats]:
    """tokenize_pairs, or what an earlier run with the same key stored."""
    folder = Path(root) / cache_key(examples, tokenizer, max_length, max_prompt_length, skip_invalid, targets)
    hit = load(folder)
    if hit is not None:
        return hit
    pairs, stats = tokenize.tokenize_pairs(
        examples, tokenizer, max_length, max_prompt_length, skip_invalid, targets
    )
    save(folder, pairs, stats)
    return pairs, stats
