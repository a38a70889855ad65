"""Command line: parses arguments and calls the public API; nothing else lives here."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import typing
from pathlib import Path

from dpokit.config import ConfigError, DataConfig, field_docs, help_text, load_config
from dpokit.data import DataError
from dpokit.errors import TrainingError, UsageError
from dpokit.generate import SamplingError
from dpokit.models import ModelLoadError
from dpokit.rewards import RewardError
from dpokit.validation import DEDUPLICATE

USER_ERRORS = (ConfigError, DataError, ModelLoadError, TrainingError, UsageError, RewardError, SamplingError)
FILTER_FLAGS = (
    "deduplicate",
    "drop_identical",
    "max_similarity",
    "min_agreement",
    "min_score_gap",
    "min_confidence",
    "rebalance_length",
    "skip_invalid",
)
"""DataConfig fields that `dpokit data filter` takes as flags (same names, same docs, same defaults)."""


class _Stderr(logging.Handler):
    """Log lines to whatever sys.stderr is at the time (a console, a log file, a test's capture)."""

    def emit(self, record: logging.LogRecord) -> None:
        sys.stderr.write(self.format(record) + "\n")


def _dotted_flags(extra: list[str]) -> tuple[list[str], list[str]]:
    """`--loss.beta 0.2` / `--loss.beta=0.2` -> `loss.beta=0.2`, and `key=value` overrides argparse could not
    place (after a flag: `CONFIG --num-processes 2 loss.beta=0.2`); returns (overrides, unrecognized)."""
    overrides, bad, i = [], [], 0
    while i < len(extra):
        arg = extra[i]
        if not arg.startswith("-") and "=" in arg:
            overrides.append(arg)
        elif arg.startswith("--") and "." in arg:
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
    raw = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser(
        "train",
        help="train a policy",
        formatter_class=raw,
        epilog="config keys (set in YAML, as key=value or --key value):\n" + help_text(),
    )
    p.add_argument(
        "config", nargs="?", help="YAML config file (optional: everything can be given as overrides)"
    )
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. loss.beta=0.2")
    p.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue RUN_DIR from its latest checkpoint, with its config.yaml "
        "(overrides may follow; a config file may not)",
    )
    p.add_argument(
        "--num-processes",
        type=int,
        default=1,
        help="data-parallel processes on this machine, launched through `accelerate launch` (gloo on CPU)",
    )
    r = sub.add_parser(
        "precompute-ref",
        help="compute the reference log-probs of a training config once and cache them on disk",
        formatter_class=raw,
        epilog="Training with train.precompute_ref=true and the same model, data and settings reuses the cache.",
    )
    r.add_argument("config", nargs="?", help="YAML config file")
    r.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.max_length=512")
    it = sub.add_parser(
        "iterate",
        help="on-policy iterative DPO: rounds of sample -> score -> pair -> train -> evaluate",
        formatter_class=raw,
        epilog="Run it again with the same config (or --resume RUN_DIR) to continue a stopped run; docs/iterate.md."
        "\n\nconfig keys (set in YAML, as key=value or --key value):\n" + help_text("iterate"),
    )
    it.add_argument("config", nargs="?", help="YAML config file (model, lora, loss, train, iterate sections)")
    it.add_argument("overrides", nargs="*", help="dotted overrides, e.g. iterate.rounds=5")
    it.add_argument(
        "--resume", metavar="RUN_DIR", help="continue RUN_DIR with its config.yaml (overrides may follow)"
    )
    add_data_parsers(sub)
    add_demo_parser(sub)
    add_eval_parser(sub)
    ex = sub.add_parser(
        "export",
        help="merge a run's policy into a plain Hugging Face folder; optionally a GGUF + Ollama Modelfile",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ex.add_argument("target", help="a run dir (its final checkpoint) or a checkpoint folder")
    ex.add_argument("--out", required=True, help="new folder for the merged model")
    ex.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="weights of the folder")
    ex.add_argument(
        "--gguf", metavar="FILE", help="also write a GGUF file (llama architecture) and FILE's Modelfile"
    )
    ex.add_argument("--gguf-type", default="f16", choices=["f32", "f16", "bf16", "q8_0", "q4_1"])
    rp = sub.add_parser("report", help="write RUN_DIR/report.html: one self-contained page (works offline)")
    rp.add_argument("run_dir")
    rp.add_argument("--out", help="output file (default RUN_DIR/report.html)")
    return parser


def add_data_parsers(sub) -> None:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    data = sub.add_parser("data", help="inspect or filter a preference file").add_subparsers(
        dest="data_command", required=True
    )
    c = data.add_parser(
        "check", help="report the known DPO failure modes of a preference file", formatter_class=fmt
    )
    c.add_argument(
        "data", nargs="+", help="preference file(s) (JSON/JSONL/gz/Parquet/CSV/saved dataset) or builtin:demo"
    )
    c.add_argument("--model", help="count tokens with this model's tokenizer (needed for truncation)")
    c.add_argument("--max-length", type=int, help="count truncation at this data.max_length (needs --model)")
    c.add_argument(
        "--max-prompt-length",
        type=int,
        help="count truncation at this data.max_prompt_length (needs --model)",
    )
    c.add_argument(
        "--similarity-threshold",
        type=float,
        default=0.9,
        help="report pairs whose chosen/rejected Dice similarity exceeds this",
    )
    c.add_argument("--json", action="store_true", help="print the full report as JSON")
    f = data.add_parser(
        "filter",
        help="write a cleaned copy of a preference file, counting every drop",
        formatter_class=fmt,
        description="Every filter is the data.* key of training's pre-filters, with the same default.",
    )
    f.add_argument("data", help="preference file")
    f.add_argument("--out", required=True, help="output JSONL file")
    f.add_argument(
        "--model", help="count tokens with this model's tokenizer (similarity and length), else words"
    )
    f.add_argument("--seed", type=int, default=0, help="seed of the length rebalancing subsample")
    docs, hints = field_docs(DataConfig), typing.get_type_hints(DataConfig)
    for name in FILTER_FLAGS:
        flag, default, doc = (
            "--" + name.replace("_", "-"),
            getattr(DataConfig, name),
            docs[name].replace("%", "%%"),
        )
        if hints[name] is bool:
            f.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=doc)
        elif name == "deduplicate":
            f.add_argument(flag, choices=DEDUPLICATE, default=default, help=doc)
        else:
            f.add_argument(flag, type=float, default=default, help=doc)


def add_demo_parser(sub) -> None:
    d = sub.add_parser(
        "demo",
        help="the DPO paper's sentiment experiment on the embedded SmolLM2-135M-Instruct (the main job)",
        description="Sample review continuations, label pairs by VADER sentiment, train DPO with LoRA, and compare "
        "reward and KL of policy and reference on held-out prompts; writes RUN_DIR/report.html.",
    )
    d.add_argument(
        "overrides",
        nargs="*",
        help="dotted training overrides on top of the demo settings, e.g. loss.beta=0.2",
    )
    d.add_argument(
        "--sweep",
        action="store_true",
        help="also several betas, preferred-FT and best-of-N: the reward-vs-KL frontier",
    )
    d.add_argument("--run-dir", help="output folder (default runs/demo-<time>)")
    d.add_argument("--train-prompts", type=int, default=None, help="training prompts (two samples each)")
    d.add_argument("--eval-prompts", type=int, default=None, help="held-out prompts")


def add_eval_parser(sub) -> None:
    e = sub.add_parser(
        "eval",
        help="held-out preference metrics, and reward / win rate / KL of sampled completions vs the reference",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="Reward specs: vader, vader:full, length, length:words, length:tokens=MODEL, keywords:great,-awful, "
        "regex:PATTERN, model:PATH[@LABEL] (a sequence-classification folder), package.module:function.",
    )
    e.add_argument(
        "target", help="a run dir (its final checkpoint vs its config's model) or a model (needs --ref)"
    )
    e.add_argument(
        "--data", help="preference file: accuracy, margins, log-ratios, KL of the chosen completions"
    )
    e.add_argument(
        "--prompts",
        help="prompt file (records with a `prompt`) or builtin:reviews; default: the prompts of --data",
    )
    e.add_argument("--split", help="keep only prompt records whose `split` field equals this (e.g. eval)")
    e.add_argument("--reward", help="score completions sampled from policy and reference with this reward")
    e.add_argument("--ref", help="reference model (default: the run's starting model)")
    e.add_argument("--num-prompts", type=int, default=64, help="prompts to sample on (0 = all)")
    e.add_argument("--samples", type=int, default=2, help="completions per prompt from each model")
    e.add_argument("--max-new-tokens", type=int, default=48, help="most tokens sampled per completion")
    e.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (0 = greedy)")
    e.add_argument(
        "--top-p",
        type=float,
        default=1.0,
        help="nucleus sampling: keep the smallest token set of this probability",
    )
    e.add_argument(
        "--batch-size", type=int, default=32, help="sequences per generation batch / pairs per scoring batch"
    )
    e.add_argument(
        "--max-length", type=int, default=1024, help="most tokens of prompt + completion when scoring --data"
    )
    e.add_argument(
        "--max-prompt-length", type=int, default=512, help="most prompt tokens when scoring --data"
    )
    e.add_argument("--seed", type=int, default=0, help="sampling seed")
    e.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="bf16 autocast (default: as trained)",
    )
    e.add_argument(
        "--out", help="folder for eval.json and eval_samples.jsonl (default: the run dir, else ./eval-<time>)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    flags, unknown = _dotted_flags(extra)
    if unknown or (flags and args.command not in ("train", "precompute-ref", "demo", "iterate")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or flags)}")
    configure_logging(args.verbose)
    if args.command == "train" and args.num_processes > 1 and "RANK" not in os.environ:
        return launch_data_parallel(args.num_processes, argv if argv is not None else sys.argv[1:])
    try:
        COMMANDS[args.command](args, flags)
    except USER_ERRORS as err:
        end_process_group(in_step=False)
        print(f"dpokit {args.command}: error: {err}", file=sys.stderr)
        return 2
    end_process_group(in_step=True)
    return 0


def configure_logging(verbose: bool) -> None:
    root = logging.getLogger()
    if not any(isinstance(h, _Stderr) for h in root.handlers):
        handler = _Stderr()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    for noisy in ("httpx", "urllib3", "filelock", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def end_process_group(in_step: bool) -> None:
    """Tear the process group down before exit: gloo aborts a process (`terminate called without an active
    exception`) that exits while another still talks to it. `in_step`: every process got here together (a
    finished command), so they first wait for each other; after an error one may never come."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if in_step:
            dist.barrier()
        dist.destroy_process_group()


def train_config(args, flags: list[str]):
    """The config of `train` / `precompute-ref`: a YAML file and overrides, or a run dir's own (--resume)."""
    config, overrides = args.config, list(args.overrides)
    if config and "=" in config:  # only overrides were given
        config, overrides = None, [config, *overrides]
    resume = getattr(args, "resume", None)
    if resume:
        if config:
            raise UsageError(
                f"--resume {resume} continues the run with its own config.yaml; a config file cannot be given too "
                f"(got {config}). To change a setting, give it as an override, e.g. train.max_steps=200"
            )
        if not Path(resume).is_dir():
            raise UsageError(f"--resume {resume}: no such folder")
        if not (Path(resume) / "config.yaml").is_file():
            raise UsageError(
                f"--resume {resume}: holds no run (no config.yaml); a run that failed to start leaves none"
            )
        config = str(Path(resume) / "config.yaml")
        overrides += ["train.resume=true", f"train.run_dir={resume}"]
    command = "iterate" if args.command == "iterate" else "train"
    return load_config(config, overrides + flags, command)


def cmd_iterate(args, flags) -> None:
    from dpokit.iterate import round_line, run_iterate

    results = run_iterate(train_config(args, flags))
    for r in results:
        print(f"round {r.round}: {round_line(r.summary)}")
    if results:
        print(f"run dir: {results[0].folder.parent.parent}")


def cmd_train(args, flags) -> None:
    from dpokit.train import train

    result = train(train_config(args, flags))
    if result.already_complete:
        print(
            f"{result.run_dir}: the run is complete ({result.stopped}; checkpoint {result.checkpoint.name}); nothing to resume"
        )
    else:
        print(f"run dir: {result.run_dir}")


def cmd_precompute(args, flags) -> None:
    from dpokit.train import precompute_reference

    stats = precompute_reference(train_config(args, flags))
    if stats is None:
        print("this loss uses no reference model: nothing to compute")
        return
    for split in ("train", "eval"):
        st = stats[split]
        print(
            f"{split}: {st['pairs']} pairs in {st['batches']} batches ({st['computed']} computed, {st['reused']} reused)"
        )
    print(f"reference log-probs: {stats['cache']}")


def cmd_data(args, flags) -> None:
    import json

    tokenizer = None
    if args.data_command == "check" and (args.max_length or args.max_prompt_length) and not args.model:
        raise UsageError(
            "--max-length / --max-prompt-length count truncation in the model's tokens: give --model too"
        )
    if args.model:
        from dpokit.models import load_tokenizer, resolve_model_path

        tokenizer = load_tokenizer(resolve_model_path(args.model, "--model"))
    if args.data_command == "check":
        from rich.console import Console

        from dpokit.data.check import check_file
        from dpokit.data.report import render

        reports = [
            check_file(p, tokenizer, args.max_length, args.max_prompt_length, args.similarity_threshold)
            for p in args.data
        ]
        if args.json:
            print(json.dumps(reports[0] if len(reports) == 1 else reports, indent=2))
        else:
            for report in reports:
                render(report, Console())
        return
    from dpokit.data.filters import filter_file

    settings = dataclasses.replace(DataConfig(), **{k: getattr(args, k) for k in FILTER_FLAGS})
    result = filter_file(args.data, Path(args.out), settings, tokenizer, args.seed)
    print(f"kept {result.kept} of {result.records} records -> {args.out}")
    for reason, n in result.dropped.items():
        print(f"  dropped {n}: {reason}")


def cmd_demo(args, flags) -> None:
    from dpokit.demo import DemoSettings, run_demo, summary_lines

    ds = DemoSettings()
    ds.train_prompts = args.train_prompts or ds.train_prompts
    ds.eval_prompts = args.eval_prompts or ds.eval_prompts
    result = run_demo(list(args.overrides) + flags, sweep=args.sweep, run_dir=args.run_dir, settings=ds)
    print("\n".join(summary_lines(result)))


def cmd_eval(args, flags) -> None:
    import json

    from dpokit.evaluation import run_eval
    from dpokit.generate import SamplingSettings

    sampling = SamplingSettings(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    results, path = run_eval(
        args.target,
        data=args.data,
        prompts=args.prompts,
        split=args.split,
        reward=args.reward,
        ref=args.ref,
        num_prompts=args.num_prompts,
        samples=args.samples,
        sampling=sampling,
        bf16=args.bf16,
        max_length=args.max_length,
        max_prompt_length=args.max_prompt_length,
        batch_size=args.batch_size,
        out=args.out,
    )
    print(json.dumps({k: v for k, v in results.items() if k in ("preference", "generation")}, indent=2))
    print(f"results: {path}")


def cmd_export(args, flags) -> None:
    from dpokit.export import export

    done = export(args.target, args.out, args.dtype, args.gguf, args.gguf_type)
    print(f"merged model: {done.folder}")
    if done.gguf:
        print(f"GGUF ({args.gguf_type}): {done.gguf}   Ollama: ollama create NAME -f {done.modelfile}")
    print(f"export took {done.seconds:.1f} s")


def cmd_report(args, flags) -> None:
    from dpokit.report import write_report

    print(f"report: {write_report(args.run_dir, args.out)}")


COMMANDS = {
    "train": cmd_train,
    "iterate": cmd_iterate,
    "precompute-ref": cmd_precompute,
    "data": cmd_data,
    "demo": cmd_demo,
    "eval": cmd_eval,
    "report": cmd_report,
    "export": cmd_export,
}


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
        cmd = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            str(n),
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
        ]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n)]
    threads = max(1, (os.cpu_count() or 1) // n)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(threads))}
    return subprocess.call([*cmd, "-m", "dpokit.cli", *rest], env=env)


if __name__ == "__main__":
    code = main()
    if "RANK" in os.environ:  # a process of a data-parallel launch
        # gloo's worker threads can abort interpreter finalization at random (SIGABRT: `terminate called without
        # an active exception`), destroyed process group or not (seen 1 run in 4 here). Everything is written
        # and flushed by now, so such a process leaves without finalizing.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
