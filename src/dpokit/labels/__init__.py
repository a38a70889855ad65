"""Preferences collected by people, in dpokit: a labeling folder (FOLDER/labels.sqlite) of comparisons, the
local web page where annotators choose between two completions (`dpokit label serve`), and the exports
training reads (`dpokit label export`). An iterate run with iterate.judge=human keeps its own in RUN/labels.

    from dpokit import labels
    labels.prepare("labels", data="samples.jsonl", overlap=2)     # or model="smollm2-135m-instruct", prompts=...
    labels.serve("labels")                                         # http://127.0.0.1:8765/ until Ctrl-C
    labels.export("labels", "pairs.jsonl")                         # -> {"written": ..., "tie": ..., ...}
    labels.stats("labels")["agreement"]

Imports no torch (sampling from a model does, when asked for) and no web framework until serving.
"""

from __future__ import annotations

import os
from pathlib import Path

from dpokit.errors import UsageError
from dpokit.labels.results import FORMATS
from dpokit.labels.store import Store
from dpokit.rundir import Run

__all__ = ["Store", "folder_of", "prepare", "serve", "export", "stats"]
TOKEN_ENV = "DPOKIT_LABEL_TOKEN"


def folder_of(folder) -> Path:
    """The labeling folder a path names: an iterate run's RUN/labels, else the folder itself."""
    run = Run(folder)
    return run.labels if run.exists and run.is_iterate else Path(folder)


def prepare(
    folder,
    data=None,
    model: str | None = None,
    prompts=None,
    samples: int = 2,
    max_new_tokens: int = 64,
    seed: int = 0,
    num_prompts: int = 0,
    overlap: int | None = None,
) -> dict:
    """Open (or create) the labeling folder and add comparisons: every pair of a prompt's completions in
    `data` (a file: prompt + completions, or chosen/rejected), or of `samples` completions per prompt of
    `prompts` sampled from `model` (a model name, folder or run). Comparisons already there are not added
    twice. Returns counts: comparisons (all), new, records, identical (pairs of equal texts left out)."""
    where = folder_of(folder)
    if data is not None and model is not None:
        raise UsageError("give comparisons from a file (--data) or a model to sample (--model), not both")
    if model is not None and prompts is None:
        raise UsageError("--model samples completions of prompts: give --prompts FILE")
    if overlap is not None and overlap < 1:
        raise UsageError(f"--overlap {overlap}: how many annotators label each comparison, at least 1")
    items, counts = [], {"records": 0, "identical": 0}
    if data is not None:
        from dpokit.labels.sources import from_file

        items, counts = from_file(data)  # read whole before anything is written
    elif model is not None:
        from dpokit.labels.sources import from_model

        where.mkdir(parents=True, exist_ok=True)
        items, counts = from_model(where, model, prompts, samples, max_new_tokens, seed, num_prompts)
    store = Store(where, create=bool(items))
    if overlap is not None:
        store.set_setting("overlap", overlap)
    new = store.add(items)
    return {"folder": str(where), "comparisons": len(store.comparisons()), "new": new, **counts}


def serve(folder, host: str = "127.0.0.1", port: int = 8765, token: str | None = None, ready=None) -> None:
    """Serve the labeling page of `folder` until Ctrl-C / SIGTERM. `token` (default: $DPOKIT_LABEL_TOKEN) is
    needed to bind an address other than loopback; `ready(url)` is called once the socket listens."""
    from dpokit.labels.server import Server

    store = Store(folder_of(folder))
    server = Server(store, host, port, token if token is not None else os.environ.get(TOKEN_ENV, ""))
    if ready is not None:
        ready(server.url)
    server.run()


def export(folder, out, format: str = "pairs") -> dict:
    """Write the labels to `out` (JSONL): `pairs` (prompt/chosen/rejected by majority) or `votes` (one vote
    per annotator, dpokit's votes format). Returns the counts (written, and each outcome)."""
    from dpokit.labels.results import export as write

    if format not in FORMATS:
        raise UsageError(f"--format {format}: expected one of {', '.join(FORMATS)}")
    out = Path(out)
    if not out.parent.is_dir():
        raise UsageError(f"{out}: its folder {out.parent} does not exist")
    return write(Store(folder_of(folder)), out, format)


def stats(folder) -> dict:
    """Progress, each annotator's counts, and agreement between annotators (labels/results.stats)."""
    from dpokit.labels.results import stats as figures

    return figures(Store(folder_of(folder)))
