"""Command line: parses arguments and calls the public API; nothing else lives here."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from dpokit.config import ConfigError, help_text, load_config
from dpokit.data import DataError
from dpokit.errors import TrainingError
from dpokit.models import ModelLoadError

USER_ERRORS = (ConfigError, DataError, ModelLoadError, TrainingError, FileNotFoundError)


def _dotted_flags(extra: list[str]) -> tuple[list[str], list[str]]:
    """`--loss.beta 0.2` / `--loss.beta=0.2` -> `loss.beta=0.2`; returns (overrides, unrecognized)."""
    overrides, bad, i = [], [], 0
    while i < len(extra):
        arg = extra[i]
        if arg.startswith("--") and "." in arg:
            key = arg[2:]
            if "=" in key:
                overrides.append(key)
            elif i + 1 < len(extra):
                overrides.append(f"{key}={extra[i + 1]}")
                i += 1
            else:
                bad.append(arg)
        else:
            bad.append(arg)
        i += 1
    return overrides, bad


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dpokit", description="Direct Preference Optimization trainer.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    fmt = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser(
        "train", help="train a policy", formatter_class=fmt, epilog="config keys (set in YAML, as key=value or --key value):\n" + help_text()
    )
    p.add_argument("config", nargs="?", help="YAML config file (optional: everything can be given as overrides)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. loss.beta=0.2")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue RUN_DIR from its latest checkpoint, with its config.yaml")
    p.add_argument(
        "--num-processes",
        type=int,
        default=1,
        help="data-parallel processes on this machine, launched through `accelerate launch` (gloo on CPU)",
    )
    r = sub.add_parser(
        "precompute-ref",
        help="compute the reference log-probs of a training config once and cache them on disk",
        formatter_class=fmt,
        epilog="Training with train.precompute_ref=true and the same model, data and settings reuses the cache.",
    )
    r.add_argument("config", nargs="?", help="YAML config file")
    r.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.max_length=512")
    data = sub.add_parser("data", help="inspect or filter a preference file").add_subparsers(dest="data_command", required=True)
    c = data.add_parser("check", help="report the known DPO failure modes of a preference file")
    c.add_argument("data", nargs="+", help="preference file(s) (JSON/JSONL/gz/Parquet/CSV/saved dataset)")
    c.add_argument("--model", help="tokenize with this model's tokenizer (needed for truncation numbers)")
    c.add_argument("--max-length", type=int, default=None)
    c.add_argument("--max-prompt-length", type=int, default=None)
    c.add_argument("--similarity-threshold", type=float, default=0.9)
    c.add_argument("--json", action="store_true", help="print the report as JSON")
    f = data.add_parser("filter", help="write a cleaned copy of a preference file, counting every drop")
    f.add_argument("data")
    f.add_argument("--out", required=True, help="output JSONL file")
    f.add_argument("--model", help="tokenize with this model's tokenizer (for similarity and length)")
    f.add_argument("--keep-identical", action="store_true", help="keep pairs whose chosen == rejected")
    f.add_argument("--max-similarity", type=float, default=1.0)
    f.add_argument("--min-agreement", type=float, default=None)
    f.add_argument("--min-score-gap", type=float, default=None)
    f.add_argument("--min-confidence", type=float, default=None)
    f.add_argument("--rebalance-length", action="store_true")
    f.add_argument("--skip-invalid", action="store_true")
    f.add_argument("--seed", type=int, default=0)
    d = sub.add_parser("demo", help="DPO with LoRA on the embedded SmolLM2-135M-Instruct (the main job)")
    d.add_argument("overrides", nargs="*", help="dotted overrides on top of the demo settings")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    flags, unknown = _dotted_flags(extra)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.command == "train" and args.num_processes > 1 and "RANK" not in os.environ:
        return launch_data_parallel(args.num_processes, argv if argv is not None else sys.argv[1:])
    try:
        if args.command in ("train", "precompute-ref"):
            from dpokit.train import precompute_reference, train

            config, overrides = args.config, list(args.overrides)
            if config and "=" in config:  # only overrides were given
                config, overrides = None, [config, *overrides]
            if getattr(args, "resume", None):
                if config:
                    overrides = [config, *overrides] if "=" in config else overrides
                config = f"{args.resume}/config.yaml"
                overrides += ["train.resume=true", f"train.run_dir={args.resume}"]
            cfg = load_config(config, overrides + flags)
            if args.command == "train":
                print(f"run dir: {train(cfg).run_dir}")
            else:
                for path in precompute_reference(cfg):
                    print(f"reference log-probs: {path}")
        elif args.command == "data":
            run_data_command(args)
        elif args.command == "demo":
            from dpokit.demo import run_demo, summary_lines

            result = run_demo(list(args.overrides) + flags)
            print("\n".join(summary_lines(result)))
    except USER_ERRORS as err:
        print(f"dpokit {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


def launch_data_parallel(n: int, argv: list[str]) -> int:
    """Re-run this command in `n` processes; Accelerate sets up the process group in each (no home-made one).

    GPUs: `accelerate launch --multi_gpu`. CPU: `accelerate launch --cpu` starts a single process (its
    multi-CPU path needs mpirun), so PyTorch's own launcher `torch.distributed.run` starts the processes
    and `Accelerator(cpu=True)` joins them with gloo.
    """
    import subprocess

    import torch

    rest, skip = [], False
    for a in argv:  # drop --num-processes N / --num-processes=N
        if skip:
            skip = False
        elif a == "--num-processes":
            skip = True
        elif not a.startswith("--num-processes="):
            rest.append(a)
    if torch.cuda.is_available():
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(n),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n)]
    threads = max(1, (os.cpu_count() or 1) // n)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(threads))}
    return subprocess.call([*cmd, "-m", "dpokit.cli", *rest], env=env)


def run_data_command(args) -> None:
    import json

    from rich.console import Console

    tokenizer = None
    if getattr(args, "model", None):
        from dpokit.models import load_tokenizer, resolve_model_path

        tokenizer = load_tokenizer(resolve_model_path(args.model))
    if args.data_command == "check":
        from dpokit.data.check import check_file
        from dpokit.data.report import render

        reports = [
            check_file(p, tokenizer, args.max_length, args.max_prompt_length, args.similarity_threshold) for p in args.data
        ]
        if args.json:
            print(json.dumps(reports[0] if len(reports) == 1 else reports, indent=2))
        else:
            for report in reports:
                render(report, Console())
        return
    from dpokit.data import load_examples
    from dpokit.data.filters import filter_pairs

    examples, stats = load_examples(args.data, args.skip_invalid)
    kept, dropped = filter_pairs(
        examples,
        drop_identical=not args.keep_identical,
        max_similarity=args.max_similarity,
        min_agreement=args.min_agreement,
        min_score_gap=args.min_score_gap,
        min_confidence=args.min_confidence,
        rebalance_length=args.rebalance_length,
        tokenizer=tokenizer,
        seed=args.seed,
    )
    with open(args.out, "w", encoding="utf-8") as fh:
        for e in kept:
            row = {"prompt": e.prompt, "chosen": e.chosen, "rejected": e.rejected, **({"weight": e.weight} if e.weight != 1 else {})}
            row.update({k: v for k, v in e.meta.items() if k in ("score_chosen", "score_rejected", "confidence", "agreement")})
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"kept {len(kept)} of {len(examples)} pairs -> {args.out}")
    for reason, n in {**dict(stats.skip_reasons), **dict(dropped)}.items():
        print(f"  dropped {n}: {reason}")


if __name__ == "__main__":
    sys.exit(main())
