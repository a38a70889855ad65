"""The tokenized-data cache: a hit gives exactly the pairs tokenization gives, every input of tokenization
keys it, and a second training run on the same data tokenizes nothing and trains the same."""

from __future__ import annotations

import pytest

from dpokit import tokenize
from dpokit.data import load_examples
from dpokit.data.tokcache import cache_key, tokenize_pairs_cached
from dpokit.loop import train
from helpers import load_cfg

TIMING = {"tokens_per_s", "step_time_s"}


def test_a_hit_is_exactly_what_tokenization_gives(tmp_path, tiny_tokenizer, monkeypatch):
    examples, _ = load_examples("builtin:demo")
    for i, e in enumerate(examples[::2]):  # half the pairs scored (REBEL's score gap), half not
        e.meta.update(score_chosen=0.5 + i, score_rejected=-0.25)
    fresh, fresh_stats = tokenize.tokenize_pairs(examples, tiny_tokenizer, 64, 32)
    first, _ = tokenize_pairs_cached(examples, tiny_tokenizer, 64, 32, False, root=tmp_path)
    calls = []
    real = tokenize.tokenize_pairs
    monkeypatch.setattr(tokenize, "tokenize_pairs", lambda *a, **k: calls.append(1) or real(*a, **k))
    hit, hit_stats = tokenize_pairs_cached(examples, tiny_tokenizer, 64, 32, False, root=tmp_path)
    assert not calls and hit == first == fresh  # dataclass equality: every id, weight, location, score gap
    assert [p.score_gap for p in hit[:4]] == [0.75, None, 1.75, None]
    assert hit_stats.to_dict() == fresh_stats.to_dict() and fresh_stats.prompts_truncated > 0


@pytest.mark.slow
def test_every_input_of_tokenization_keys_the_cache(tiny_tokenizer):
    examples, _ = load_examples("builtin:demo")
    base = cache_key(examples, tiny_tokenizer, 64, 32, False, "assistant")
    assert base == cache_key(list(examples), tiny_tokenizer, 64, 32, False, "assistant")
    assert base != cache_key(examples, tiny_tokenizer, 65, 32, False, "assistant")
    assert base != cache_key(examples, tiny_tokenizer, 64, 31, False, "assistant")
    assert base != cache_key(examples, tiny_tokenizer, 64, 32, True, "assistant")
    assert base != cache_key(examples, tiny_tokenizer, 64, 32, False, "all")
    assert base != cache_key(examples[1:], tiny_tokenizer, 64, 32, False, "assistant")
    assert base != cache_key(examples[::-1], tiny_tokenizer, 64, 32, False, "assistant")
    examples[0].meta["score_chosen"] = 1.0  # a pair's scores are tokenized data too (its score gap)
    assert base != cache_key(examples, tiny_tokenizer, 64, 32, False, "assistant")
    del examples[0].meta["score_chosen"]
    tiny_tokenizer.chat_template, saved = "{{ messages }}", tiny_tokenizer.chat_template
    try:
        assert base != cache_key(examples, tiny_tokenizer, 64, 32, False, "assistant")
    finally:
        tiny_tokenizer.chat_template = saved


@pytest.mark.slow
def test_a_second_run_tokenizes_nothing_and_trains_the_same(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("DPOKIT_CACHE", str(tmp_path / "cache"))  # a cold cache of its own
    first = train(load_cfg(tiny_model_dir, tmp_path / "a")).history
    from dpokit.data import prepare

    calls = []
    real = tokenize.tokenize_pairs
    counted = lambda *a, **k: calls.append(1) or real(*a, **k)  # noqa: E731
    monkeypatch.setattr(tokenize, "tokenize_pairs", counted)  # what the cache calls on a miss
    monkeypatch.setattr(prepare, "tokenize_pairs", counted)  # what data.tokenized_cache=false calls
    second = train(load_cfg(tiny_model_dir, tmp_path / "b")).history
    assert not calls
    off = train(load_cfg(tiny_model_dir, tmp_path / "c", "data.tokenized_cache=false")).history
    assert len(calls) == 2  # train and eval splits, tokenized again
    strip = lambda h: [{k: v for k, v in r.items() if k not in TIMING} for r in h]  # noqa: E731
    assert strip(first) == strip(second) == strip(off)
    assert first[0]["loss"] == pytest.approx(0.6931471805599453, abs=1e-6)
