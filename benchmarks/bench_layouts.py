"""Batch layouts on real pairs: seconds per 100 pairs and peak memory of the reference pass and of a LoRA
training step, for the padded layout, prefix sharing, and prefix sharing + packing at several `pack_tokens`,
each with dense row masks and with block (per-document) attention.

SmolLM2-135M-Instruct, Anthropic HH helpful-base test pairs (truncated to max_length / max_prompt_length as
training would), bf16 autocast by default. Every configuration runs in its own process (peak RSS is that
process's `ru_maxrss`, model load included; the time excludes the load), the configurations alternate
round by round, and the figure is the median over rounds. The summed log-probs of every configuration are
printed against the padded layout's, as a check that the layouts compute the same thing.

    python benchmarks/bench_layouts.py                      # reference pass, 100 pairs, batch 16, 2 rounds
    python benchmarks/bench_layouts.py --mode step --pairs 32
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
from helpers import HH_HELPFUL  # noqa: E402

PACKS = (512, 1024, 2048, 4096, 16384)
CONFIGS = {
    "padded": (False, False, 0, "dense"),
    "prefix dense": (True, False, 0, "dense"),
    "prefix blocks": (True, False, 0, "blocks"),
    **{f"pack {n} dense": (True, True, n, "dense") for n in PACKS[:4]},
    **{f"pack {n} blocks": (True, True, n, "blocks") for n in PACKS},
}


def child(args) -> dict:
    import torch

    from dpokit import models
    from dpokit.attention import enable_blocks
    from dpokit.batching import Layout
    from dpokit.data import load_examples
    from dpokit.logps import CompletionLogps, sum_by_sequence
    from dpokit.tokenize import tokenize_pairs

    torch.set_num_threads(args.threads)
    prefix, pack, tokens, attention = CONFIGS[args.child]
    path = models.resolve_model_path(models.SMOLLM2_ALIAS)
    tokenizer = models.load_tokenizer(path)
    examples, _ = load_examples(str(HH_HELPFUL), skip_invalid=True)
    pairs, _ = tokenize_pairs(examples[: args.pairs], tokenizer, args.max_length, args.max_prompt_length)
    model = models.load_model(path)
    if attention == "blocks":
        assert enable_blocks(model)
    if args.mode == "step":
        model = models.add_lora(model, 8, 16, 0.0, ["q_proj", "v_proj"])
    policy = CompletionLogps(model, 256, bf16=args.precision == "bf16")
    layout = Layout(prefix, pack, tokens or 4096, attention)
    total, rows, width = 0.0, 0, 0
    t0 = time.perf_counter()
    for start in range(0, len(pairs), args.batch_size):
        batch = layout.pairs(pairs[start : start + args.batch_size], tokenizer.pad_token_id)
        rows, width = rows + batch.input_ids.shape[0], max(width, batch.input_ids.shape[1])
        with torch.set_grad_enabled(args.mode == "step"):
            seq = sum_by_sequence(policy(*batch.model_args), batch.seq_index, batch.num_seqs)
            if args.mode == "step":
                seq.sum().backward()
        total += float(seq.detach().double().sum())
    seconds = time.perf_counter() - t0
    return {
        "config": args.child,
        "s_per_100_pairs": seconds * 100 / len(pairs),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "logps_sum": total,
        "rows": rows,
        "widest_row": width,
        "pairs": len(pairs),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--mode", choices=["ref", "step"], default="ref", help="reference pass or LoRA training step"
    )
    parser.add_argument("--pairs", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--max-prompt-length", type=int, default=256)
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    runs: dict[str, list[dict]] = {c: [] for c in args.configs}
    base = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("configs", "child")]
    for r in range(args.rounds):
        for config in args.configs:
            out = subprocess.run(
                [sys.executable, __file__, *base, "--child", config],
                capture_output=True,
                text=True,
                check=True,
            )
            runs[config].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(
                f"round {r + 1} {config}: {runs[config][-1]['s_per_100_pairs']:.1f} s / 100 pairs",
                file=sys.stderr,
            )
    padded = statistics.median(x["logps_sum"] for x in runs.get("padded", runs[args.configs[0]]))
    print(
        f"{args.mode}, {args.pairs} pairs, batch {args.batch_size}, {args.precision}, {args.rounds} rounds (median)"
    )
    print("| layout | s / 100 pairs | peak RSS MiB | rows | widest row | logps vs padded |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for config, xs in runs.items():
        s = statistics.median(x["s_per_100_pairs"] for x in xs)
        rss = statistics.median(x["peak_rss_mib"] for x in xs)
        diff = (xs[0]["logps_sum"] - padded) / abs(padded)
        print(f"| {config} | {s:.1f} | {rss:.0f} | {xs[0]['rows']} | {xs[0]['widest_row']} | {diff:+.1e} |")


if __name__ == "__main__":
    main()
