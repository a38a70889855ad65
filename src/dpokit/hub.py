"""The Hugging Face hub: whether it can be reached (a model id or a dataset id must say at once when it
cannot, not after a minute of retries), and preference data by dataset id. Imports no torch."""

from __future__ import annotations

import os
import re
import socket
from urllib.parse import urlparse

DATASET_ID = re.compile(r"^([A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?::([\w.-]+))?$")
"""`org/name` or `org/name:split`."""


def offline_reason() -> str | None:
    """Why the hub cannot be used now: the offline switches, or an unreachable endpoint; None when it can."""
    if any(
        os.environ.get(v, "").lower() in ("1", "true", "yes")
        for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
    ):
        return "offline (HF_HUB_OFFLINE is set)"
    return unreachable()


def unreachable(timeout: float = 3.0) -> str | None:
    """Why the hub cannot be reached (None when it can, or when a proxy decides)."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
    except OSError as err:
        return f"the Hugging Face hub ({url.hostname}:{port}) is unreachable ({err.strerror or err})"
    return None


def dataset_records(spec: str, key: str, split: str = "train"):
    """The records of hub dataset `org/name` (its `split`, or the one after a colon) as data.InMemory, or a
    DataError saying why it cannot be had (offline and not in the local datasets cache, no such dataset or
    split)."""
    from dpokit.data.readers import DataError, InMemory

    name, chosen = DATASET_ID.match(spec).groups()
    split = chosen or split
    reason = offline_reason()
    try:
        import datasets

        if reason:  # the local datasets cache only: no minute of retries
            datasets.config.HF_HUB_OFFLINE = True
        ds = datasets.load_dataset(name, split=split)
    except Exception as err:  # datasets raises many kinds (ConnectionError, FileNotFoundError, ValueError...)
        cause = reason or str(err).strip().splitlines()[0]
        raise DataError(
            spec,
            f"not a file, and the hub dataset {name!r} (split {split!r}) cannot be loaded: {cause}"
            + (" and it is not in the local datasets cache" if reason else "")
            + f" (given as {key}). Fix: download it where the hub is reachable, or give a local file",
        ) from None
    return InMemory(f"{spec} ({split})", ds.to_list())
