"""People as the rounds' judge (iterate.judge=human): a round's samples become comparisons in the run's
labeling folder (RUN/labels), the labeling page is served while the round waits, and each sample's score is
what the annotators said of it.

A sample's score is its mean, over the comparisons with its prompt's other samples that carry a label, of
what the votes gave it: a win 1, a loss 0, a tie 0.5, both bad 0 (skips carry nothing); 0.5 when no
comparison of it was labeled. Scores depend only on the votes, so a run stopped while labels come in and
resumed ends with the same files.
"""

from __future__ import annotations

import logging
import os
import time
from collections import defaultdict

from dpokit.errors import Interrupted
from dpokit.labels import TOKEN_ENV
from dpokit.labels.store import Store, pairs_of

log = logging.getLogger(__name__)
HUMAN = "human"
POLL_S = 1.0
GIVEN = {"a": (1.0, 0.0), "b": (0.0, 1.0), "tie": (0.5, 0.5), "both_bad": (0.0, 0.0)}
"""What a vote gives the completions a and b of its comparison."""


def add_round(store: Store, r: int, samples: list[dict]) -> int:
    """Round r's comparisons: every pair of each prompt's distinct samples. Returns how many there are."""
    items = []
    for p, s in enumerate(samples):
        items += pairs_of(s["prompt"], s["completions"], {"round": r, "prompt": p})[0]
    store.add(items)
    return len(items)


def wait_for_labels(store: Store, r: int, it, stop, resume_hint: str) -> None:
    """Serve the labeling page until every comparison of round r has it.label_overlap votes; a stop signal
    ends the wait (the votes are in the database) with Interrupted."""
    from dpokit.labels.server import Server

    left, total = store.open_count(r), len(store.comparisons(r))
    if not left:
        return
    server = Server(store, it.label_host, it.label_port, os.environ.get(TOKEN_ENV, "")).start()
    try:
        log.info(
            "round %d: waiting for %d of %d comparisons to be labeled (%d annotator(s) each): open %s",
            r,
            left,
            total,
            store.overlap,
            server.url,
        )
        while left:
            if stop is not None and stop.received:
                raise Interrupted(
                    f"{stop.name} in round {r} while {left} of {total} comparisons wait for labels (the votes "
                    f"cast are saved in {store.path}); {resume_hint}",
                    stop.received,
                )
            time.sleep(POLL_S)
            now = store.open_count(r)
            if now != left:
                log.info("round %d: %d of %d comparisons left to label", r, now, total)
            left = now
    finally:
        server.stop()


def human_scores(store: Store, r: int, samples: list[dict]) -> list[list[float]]:
    """Each sample's score from the votes on round r's comparisons (see the module docstring)."""
    got: dict[tuple[int, int], list[float]] = defaultdict(list)
    votes = defaultdict(list)
    for v in store.votes():
        if v["choice"] != "skip":
            votes[v["comparison"]].append(v["choice"])
    for c in store.comparisons(r):
        given = [GIVEN[choice] for choice in votes.get(c.id, [])]
        if not given:
            continue
        p, i, j = c.source["prompt"], c.source["i"], c.source["j"]
        got[p, i].append(sum(g[0] for g in given) / len(given))
        got[p, j].append(sum(g[1] for g in given) / len(given))
    return [
        [sum(got[p, k]) / len(got[p, k]) if got[p, k] else 0.5 for k in range(len(s["completions"]))]
        for p, s in enumerate(samples)
    ]
