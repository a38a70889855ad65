"""The data path at 100K pairs: build a 100K-pair file from the Anthropic HH test splits in ../shared/data
(each HH prompt with its own chosen response, against the rejected response of another pair: real text,
recombined), then time `dpokit data check` on it, the tokenization of every pair (as training does, with
SmolLM2's tokenizer) and the tokenized-data cache's miss and hit, the peak RSS of a SmolLM2 LoRA run's
setup before its first step, and the reference cache's bytes per pair (tiny model, --ref-pairs pairs).

    python benchmarks/data_100k.py                 # writes /tmp/hh-100k.jsonl, then measures
    python benchmarks/data_100k.py --pairs 20000
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
from helpers import SHARED_DATA  # noqa: E402


def build(path: Path, n: int, seed: int = 0) -> int:
    from dpokit.data import load_examples

    examples = []
    for split in ("helpful-base", "harmless-base"):
        found, _ = load_examples(str(SHARED_DATA / "hh-rlhf" / split / "test.jsonl.gz"), skip_invalid=True)
        examples += [e for e in found if e.chosen.strip() and e.rejected.strip()]
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as fh:
        for k in range(n):
            e = examples[k % len(examples)]
            other = examples[rng.randrange(len(examples))] if k >= len(examples) else e
            fh.write(json.dumps({"prompt": e.prompt, "chosen": e.chosen, "rejected": other.rejected}) + "\n")
    return len(examples)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=100_000)
    ap.add_argument("--out", default="/tmp/hh-100k.jsonl")
    ap.add_argument("--ref-pairs", type=int, default=20_000, help="pairs of the reference-cache measurement")
    args = ap.parse_args()
    path = Path(args.out)
    t0 = time.perf_counter()
    sources = build(path, args.pairs)
    print(
        f"built {args.pairs} pairs from {sources} HH pairs in {time.perf_counter() - t0:.1f} s "
        f"({path.stat().st_size / 2**20:.0f} MiB)"
    )

    t0 = time.perf_counter()
    check = subprocess.run(
        [sys.executable, "-m", "dpokit.cli", "data", "check", str(path), "--model", "smollm2-135m-instruct"],
        capture_output=True,
        text=True,
    )
    print(f"dpokit data check: {time.perf_counter() - t0:.1f} s (exit {check.returncode})")

    from dpokit import models
    from dpokit.data import load_examples
    from dpokit.data.tokcache import tokenize_pairs_cached
    from dpokit.tokenize import tokenize_pairs

    tokenizer = models.load_tokenizer(models.resolve_model_path(models.SMOLLM2_ALIAS))
    t0 = time.perf_counter()
    examples, _ = load_examples(str(path))
    read_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    pairs, stats = tokenize_pairs(examples, tokenizer, 512, 256)
    tok_s = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(
        f"read {len(examples)} pairs in {read_s:.1f} s; tokenized {len(pairs)} in {tok_s:.1f} s; "
        f"peak RSS {rss:.2f} GiB (tokenizer + pairs, before any model)"
    )
    with tempfile.TemporaryDirectory() as root:
        for what in ("miss (tokenize + store)", "hit"):
            t0 = time.perf_counter()
            again, _ = tokenize_pairs_cached(examples, tokenizer, 512, 256, False, Path(root))
            print(f"tokenized-data cache {what}: {time.perf_counter() - t0:.1f} s, equal: {again == pairs}")
    del pairs, examples

    before_step = subprocess.run(
        [sys.executable, "-c", RSS_BEFORE_STEP, str(path)], capture_output=True, text=True
    )
    print(before_step.stdout.strip() or before_step.stderr[-2000:])
    with tempfile.TemporaryDirectory() as cache:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "dpokit.cli",
                "precompute-ref",
                "model.name=tiny-random",
                f"data.train={path}",
                f"data.limit={args.ref_pairs}",
                "data.max_length=256",
                "data.max_prompt_length=128",
                "train.batch_size=16",
                "train.epochs=1",
                f"train.ref_cache_dir={cache}",
                "train.progress=false",
            ],
            check=True,
            capture_output=True,
        )
        size = sum(f.stat().st_size for f in Path(cache).rglob("*") if f.is_file())
        print(
            f"reference cache: {size} bytes for about {args.ref_pairs} pairs ({size / args.ref_pairs:.1f} per pair)"
        )


RSS_BEFORE_STEP = """
import sys, time
from dpokit.config import load_config
from dpokit.schedule import step_schedule
from dpokit.session import setup
from dpokit.loop import make_references
t0 = time.perf_counter()
cfg = load_config(None, ["data.train=" + sys.argv[1], "data.max_length=512", "data.max_prompt_length=256",
                         "train.batch_size=4", "train.progress=false", "train.run_dir=/tmp/unused"])
s = setup(cfg)
policy = s.accelerator.prepare(s.policy)
make_references(s, policy, list(step_schedule(len(s.data.train), cfg.train, 1)), 0)
# VmHWM: this address space's peak (ru_maxrss would carry the parent's peak over the fork)
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
rss = int(hwm.split()[1]) / 2**20
print(f"SmolLM2 LoRA run on {len(s.data.train)} pairs: setup + reference in {time.perf_counter() - t0:.1f} s, "
      f"peak RSS before the first step {rss:.2f} GiB")
"""


if __name__ == "__main__":
    main()
