"""Rewards and judges for tests/test_iterate.py, imported by spec (`iterate_rewards:NAME`)."""

import os

from dpokit.data.prompts import load_prompts

BROKEN = "ITERATE_TEST_BROKEN"
"""When set, `nan_in_round_2` returns NaN for the prompts of round 2 (the user's bug); unset, it is fixed."""


def wrong_count(prompts, completions):
    return [1.0] * (len(completions) - 1)


def not_a_number(prompts, completions):
    return ["high"] * len(completions)


def nan_in_round_2(prompts, completions):
    second = set(load_prompts("builtin:reviews", "train")[6:12])  # round 2 of prompts_per_round=6
    broken = bool(os.environ.get(BROKEN))
    return [
        float("nan") if broken and p in second else float(len(c))
        for p, c in zip(prompts, completions, strict=True)
    ]


def longer(prompt, a, b):
    """P(a better than b): the longer completion wins, equal lengths tie."""
    return 1.0 if len(a) > len(b) else 0.5 if len(a) == len(b) else 0.0


def coin(prompt, a, b):
    return 0.5


def out_of_range(prompt, a, b):
    return 2.0


def raises_on_a_long_one(prompts, completions):
    """A user's bug: it fails on any completion longer than 8 characters."""
    return [float(len(c)) if len(c) <= 8 else int("not a number") for c in completions]


def judge_that_raises(prompt, a, b):
    raise KeyError("score")
