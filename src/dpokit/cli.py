"""Command line: parses arguments and calls the public API; nothing else lives here."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from dpokit.config import ConfigError, help_text, load_config
from dpokit.data import DataError
from dpokit.errors import TrainingError
from dpokit.generate import SamplingError
from dpokit.models import ModelLoadError
from dpokit.rewards import RewardError

USER_ERRORS = (ConfigError, DataError, ModelLoadError, TrainingError, FileNotFoundError, RewardError, SamplingError)


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
    d = sub.add_parser(
        "demo",
        help="the DPO paper's sentiment experiment on the embedded SmolLM2-135M-Instruct (the main job)",
        description="Sample review continuations, label pairs by VADER sentiment, train DPO with LoRA, and compare "
        "reward and KL of policy and reference on held-out prompts; writes RUN_DIR/report.html.",
    )
    d.add_argument("overrides", nargs="*", help="dotted training overrides on top of the demo settings, e.g. loss.beta=0.2")
    d.add_argument("--sweep", action="store_true", help="also several betas, preferred-FT and best-of-N: the reward-vs-KL frontier")
    d.add_argument("--run-dir", help="output folder (default runs/demo-<time>)")
    d.add_argument("--train-prompts", type=int, default=None, help="training prompts (two samples each)")
    d.add_argument("--eval-prompts", type=int, default=None, help="held-out prompts")
    e = sub.add_parser(
        "eval",
        help="held-out preference metrics, and reward / win rate / KL of sampled completions vs the reference",
        formatter_class=fmt,
        epilog="Reward specs: vader, vader:full, length, length:words, length:tokens=MODEL, keywords:great,-awful,\n"
        "regex:PATTERN, model:PATH[@LABEL] (a sequence-classification folder), package.module:function.",
    )
    e.add_argument("target", help="a run dir (its final checkpoint vs its config's model) or a model (needs --ref)")
    e.add_argument("--data", help="preference file: accuracy, margins, log-ratios, KL of the chosen completions")
    e.add_argument("--prompts", help="prompt file (records with a `prompt`) or builtin:reviews; default: the prompts of --data")
    e.add_argument("--split", help="keep only prompt records whose `split` field equals this (e.g. eval)")
    e.add_argument("--reward", help="score completions sampled from policy and reference with this reward")
    e.add_argument("--ref", help="reference model (default: the run's starting model)")
    e.add_argument("--num-prompts", type=int, default=64, help="prompts to sample on (0 = all)")
    e.add_argument("--samples", type=int, default=2, help="completions per prompt from each model")
    e.add_argument("--max-new-tokens", type=int, default=48)
    e.add_argument("--temperature", type=float, default=1.0)
    e.add_argument("--top-p", type=float, default=1.0)
    e.add_argument("--batch-size", type=int, default=32, help="sequences per generation batch / pairs per scoring batch")
    e.add_argument("--max-length", type=int, default=1024)
    e.add_argument("--max-prompt-length", type=int, default=512)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None, help="bf16 autocast (default: as trained)")
    e.add_argument("--out", help="folder for eval.json and eval_samples.jsonl (default: the run dir, else ./eval-<time>)")
    rp = sub.add_parser("report", help="write RUN_DIR/report.html: one self-contained page (works offline)")
    rp.add_argument("run_dir")
    rp.add_argument("--out", help="output file (default RUN_DIR/report.html)")
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
            from dpokit.demo import DemoSettings, run_demo, summary_lines

            ds = DemoSettings()
            ds.train_prompts = args.train_prompts or ds.train_prompts
            ds.eval_prompts = args.eval_prompts or ds.eval_prompts
            result = run_demo(list(args.overrides) + flags, sweep=args.sweep, run_dir=args.run_dir, settings=ds)
            print("\n".join(summary_lines(result)))
        elif args.command == "eval":
            run_eval_command(args)
        elif args.command == "report":
            from dpokit.report import write_report

            print(f"report: {write_report(args.run_dir, args.out)}")
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


def run_eval_command(args) -> None:
    import json
    from datetime import datetime
    from pathlib import Path

    from dpokit.evaluation import (
        generation_metrics,
        load_for_eval,
        load_prompts,
        preference_metrics,
        write_results,
    )
    from dpokit.generate import SamplingSettings
    from dpokit.rewards import get_reward

    if not args.data and not args.reward:
        raise FileNotFoundError("nothing to evaluate: give --data (preference pairs) and/or --reward (with prompts)")
    reward = get_reward(args.reward) if args.reward else None  # a bad spec fails before any model loads
    pr = load_for_eval(args.target, args.ref, bf16=args.bf16)
    results: dict = {"target": pr.source, "reference": args.ref or "the run's starting model"}
    records = None
    if args.data:
        results["preference"] = preference_metrics(pr, args.data, args.max_length, args.max_prompt_length, args.batch_size)
        results["data"] = args.data
    if reward is not None:
        source = args.prompts or args.data
        if not source:
            raise FileNotFoundError("--reward needs prompts: give --prompts FILE (or --data)")
        prompts = load_prompts(source, args.split, args.num_prompts)
        settings = SamplingSettings(
            max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
            batch_size=args.batch_size, seed=args.seed, bf16=pr.bf16,
        )
        results["generation"], records = generation_metrics(pr, prompts, reward, args.samples, settings)
        results["reward"] = args.reward
    is_run = (Path(args.target) / "config.yaml").is_file()
    out = Path(args.out) if args.out else Path(args.target) if is_run else Path(datetime.now().strftime("eval-%Y%m%d-%H%M%S"))
    path = write_results(out, results, records)
    print(json.dumps({k: v for k, v in results.items() if k in ("preference", "generation")}, indent=2))
    print(f"results: {path}")


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
