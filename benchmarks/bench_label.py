"""The labeling server under load: N concurrent simulated annotators cast votes through the HTTP API of
`dpokit label serve` (run as its own process, as users run it), each vote answered with the next
comparison. Reports the time from sending a vote to having the next comparison (median, p95, max), votes
per second, and checks that every vote was stored once (none lost, none doubled) and the overlap held.

    python benchmarks/bench_label.py                       # 20 annotators, 1,000 votes (50 comparisons x 20)
    python benchmarks/bench_label.py --annotators 50 --comparisons 100
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def call(url: str, body: dict | None = None) -> dict:
    req = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode())
    req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.loads(resp.read())


def annotate(base: str, who: str) -> list[float]:
    """Vote on everything offered to `who`; the seconds from each vote sent to its next comparison read."""
    shown, times = call(f"{base}api/next?annotator={who}"), []
    while shown["comparison"] is not None:
        body = {"annotator": who, "comparison": shown["comparison"]["id"], "choice": "left", "comment": ""}
        started = time.perf_counter()
        shown = call(base + "api/vote", body)
        times.append(time.perf_counter() - started)
    return times


def run_annotators(base: str, n: int) -> tuple[float, list[float], dict]:
    """n annotators at once until nothing is left: wall seconds, every vote's latency, the final stats."""
    started = time.perf_counter()
    with ThreadPoolExecutor(n) as pool:
        times = [t for ts in pool.map(lambda i: annotate(base, f"annotator-{i}"), range(n)) for t in ts]
    return time.perf_counter() - started, times, call(base + "api/stats")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--annotators", type=int, default=20)
    p.add_argument("--comparisons", type=int, default=50)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-label-"))
    data = work / "comparisons.jsonl"
    data.write_text(
        "".join(
            json.dumps({"prompt": f"prompt {i}", "completions": [f"answer {i} one", f"answer {i} two"]})
            + "\n"
            for i in range(args.comparisons)
        )
    )
    folder = work / "labels"
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dpokit.cli",
            "label",
            "serve",
            str(folder),
            "--data",
            str(data),
            "--port",
            "0",
            "--overlap",
            str(args.annotators),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        base = next(m.group(1) for line in server.stdout if (m := re.search(r"open (http://\S+)", line)))
        wall, times, stats = run_annotators(base, args.annotators)
    finally:
        server.terminate()
        server.wait()

    from dpokit.labels.store import Store

    votes = Store(folder).votes()
    per_pair = Counter((v["comparison"], v["annotator"]) for v in votes)
    per_comparison = Counter(v["comparison"] for v in votes)
    expected = args.annotators * args.comparisons
    ok = (
        len(times) == len(votes) == expected
        and max(per_pair.values()) == 1
        and set(per_comparison.values()) == {args.annotators}
    )
    times.sort()
    print(
        f"{args.annotators} annotators, {len(votes)} votes stored of {len(times)} cast ({expected} expected; "
        f"{'each once, overlap held' if ok else 'MISMATCH'}) in {wall:.1f} s ({len(times) / wall:.0f} votes/s); "
        f"vote -> next comparison: median {1000 * statistics.median(times):.1f} ms, "
        f"p95 {1000 * times[int(0.95 * (len(times) - 1))]:.1f} ms, max {1000 * times[-1]:.1f} ms; "
        f"complete {stats['complete']} of {stats['comparisons']}"
    )
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
