"""Command line: parses arguments, calls the public API (api.py) and prints what it returns. A DpokitError
becomes its one line and exit code 2; starting and ending processes is launch.py's."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import typing

from dpokit import api, launch
from dpokit.config import ConfigError, DataConfig, field_docs, help_text, parse_overrides
from dpokit.errors import DataError, DpokitError, Interrupted
from dpokit.labels.cli import add_label_parser, cmd_label
from dpokit.modelcard import version
from dpokit.validation import DEDUPLICATE


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
    parser.add_argument("--version", action="version", version=f"dpokit {version()}")
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
    rm = sub.add_parser(
        "train-rm",
        help="train a reward model on preference pairs (Bradley-Terry): RUN_DIR/reward_model scores as model:RUN_DIR",
        formatter_class=raw,
        epilog="config keys (set in YAML, as key=value or --key value):\n" + help_text(),
    )
    rm.add_argument(
        "config", nargs="?", help="YAML config file (model, lora, data, loss, train, eval sections)"
    )
    rm.add_argument(
        "overrides", nargs="*", help="dotted overrides, e.g. loss.center_rewards_coefficient=0.01"
    )
    rm.add_argument("--resume", metavar="RUN_DIR", help="continue RUN_DIR from its latest checkpoint")
    rm.add_argument(
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
    add_label_parser(sub)
    ex = sub.add_parser(
        "export",
        help="merge a run's policy into a plain Hugging Face folder; optionally a GGUF + Ollama Modelfile",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ex.add_argument("target", help="a run dir (its final checkpoint) or a checkpoint folder")
    ex.add_argument("--out", required=True, help="new folder for the merged model")
    from dpokit.exporter import DTYPES, GGUF_TYPES

    ex.add_argument("--dtype", default="fp32", choices=list(DTYPES), help="weights of the folder")
    ex.add_argument(
        "--gguf", metavar="FILE", help="also write a GGUF file (llama architecture) and FILE's Modelfile"
    )
    ex.add_argument("--gguf-type", default="f16", choices=list(GGUF_TYPES), help="tensor type of the GGUF")
    ex.add_argument(
        "--lambda",
        dest="lam",
        type=float,
        default=1.0,
        help="interpolate toward where training started: 0 = the start, 1 = as trained (dpokit eval --lambda "
        "measures the choices)",
    )
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
    sp = data.add_parser(
        "split",
        help="split a preference file by prompt into parts (no prompt in two parts), one file each",
        formatter_class=fmt,
    )
    sp.add_argument("data", help="preference file (any format dpokit reads)")
    sp.add_argument("--out", required=True, help="folder for NAME.jsonl of each part")
    sp.add_argument("--parts", default="train=0.8,heldout=0.2", help="NAME=SHARE,... of the distinct prompts")
    sp.add_argument("--seed", type=int, default=0, help="seed of the prompts' ranking")
    sp.add_argument("--skip-invalid", action="store_true", help="skip and count invalid records")
    sp.add_argument(
        "--chat",
        action="store_true",
        help="write Anthropic HH transcripts (Human: / Assistant: turns) as chat messages",
    )
    f.add_argument("data", help="preference file")
    f.add_argument("--out", required=True, help="output JSONL file")
    f.add_argument(
        "--model", help="count tokens with this model's tokenizer (similarity and length), else words"
    )
    f.add_argument("--seed", type=int, default=0, help="seed of the length rebalancing subsample")
    docs, hints = field_docs(DataConfig), typing.get_type_hints(DataConfig)
    for name in api.FILTERS:
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
    e.add_argument(
        "--out", help="folder for eval.json and eval_samples.jsonl (default: the run dir, else ./eval-<time>)"
    )
    e.add_argument("--json", action="store_true", help="print the figures as JSON instead of a table")
    e.add_argument(
        "--lambda",
        dest="lambdas",
        metavar="L1,L2,...",
        help="measure the policy interpolated toward where its training started at each of these lambdas (0 = "
        "the start, 1 = as trained; list 1 to include the run itself): a reward-KL curve from one run",
    )
    docs, hints = field_docs(api.EvalSettings), typing.get_type_hints(api.EvalSettings)
    for f in dataclasses.fields(api.EvalSettings):
        flag, doc = "--" + f.name.replace("_", "-"), docs[f.name].replace("%", "%%").rstrip(".")
        if f.name == "bf16":
            e.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=doc)
        else:
            e.add_argument(flag, type=hints[f.name], default=f.default, help=doc)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    flags, unknown = _dotted_flags(extra)
    if unknown or (flags and args.command not in ("train", "train-rm", "precompute-ref", "demo", "iterate")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or flags)}")
    configure_logging(args.verbose)
    if args.command in ("train", "train-rm") and args.num_processes > 1 and not launch.launched():
        return launch.data_parallel(args.num_processes, argv if argv is not None else sys.argv[1:])
    try:
        COMMANDS[args.command](args, flags)
    except Interrupted as err:
        launch.end_process_group(in_step=False)
        print(f"dpokit {args.command}: stopped: {err}", file=sys.stderr)
        return 128 + err.signum
    except KeyboardInterrupt:  # a second Ctrl-C, or one outside a run's steps
        launch.end_process_group(in_step=False)
        print(f"dpokit {args.command}: stopped at once (Ctrl-C); what was not saved is lost", file=sys.stderr)
        return 130
    except DpokitError as err:
        launch.end_process_group(in_step=False)
        print(f"dpokit {args.command}: error: {err}", file=sys.stderr)
        return 2
    launch.end_process_group(in_step=True)
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


def config_args(args, flags: list[str]) -> tuple[str | None, dict]:
    """(config file, overrides as dotted keys) of `train` / `precompute-ref` / `iterate`: a YAML file and
    `key=value` overrides (the first may stand where the file would)."""
    config, overrides = args.config, [*args.overrides, *flags]
    if config and "=" in config:  # only overrides were given
        config, overrides = None, [config, *overrides]
    sections, problems = parse_overrides(overrides)
    if problems:
        raise ConfigError(problems)
    return config, _dotted(sections)


def _dotted(sections: dict, prefix: str = "") -> dict:
    """Nested overrides as dotted keys (the API's `data` argument is data, not the data section)."""
    out = {}
    for key, value in sections.items():
        if isinstance(value, dict) and value:
            out.update(_dotted(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def cmd_train(args, flags) -> None:
    config, overrides = config_args(args, flags)
    run = api.train(config, resume=args.resume, **overrides)
    print(f"run dir: {run.path}")


def cmd_train_rm(args, flags) -> None:
    config, overrides = config_args(args, flags)
    run = api.train_rm(config, resume=args.resume, **overrides)
    final = (run.summary or {}).get("final_eval") or {}
    if "eval/rewards/accuracies" in final:
        print(
            f"held-out pair accuracy {final['eval/rewards/accuracies']:.3f}, margin {final['eval/rewards/margins']:+.3f}"
        )
    print(f"run dir: {run.path}   reward model: {run.reward_model_path} (reward spec: model:{run.path})")


def cmd_iterate(args, flags) -> None:
    from dpokit.rounds import round_line

    config, overrides = config_args(args, flags)
    run = api.iterate(config, resume=args.resume, **overrides)
    for r in run.rounds:
        print(f"round {r.number}: {round_line(r.summary)}")
    print(f"run dir: {run.path}")


def cmd_precompute(args, flags) -> None:
    config, overrides = config_args(args, flags)
    stats = api.precompute_ref(config, **overrides)
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
    if args.data_command == "check":
        reports = [
            api.check(
                p,
                model=args.model,
                max_length=args.max_length,
                max_prompt_length=args.max_prompt_length,
                similarity_threshold=args.similarity_threshold,
            )
            for p in args.data
        ]
        if args.json:
            print(json.dumps(reports[0] if len(reports) == 1 else reports, indent=2))
        else:
            from rich.console import Console

            from dpokit.data.report import render

            for report in reports:
                render(report, Console())
        empty = [r for r in reports if not r.trainable]
        if empty:  # said after the report: the reasons are in it
            raise DataError(
                empty[0]["file"], f"nothing to train on: none of its {empty[0].records} records is usable"
            )
        return
    if args.data_command == "split":
        counts = api.split(
            args.data,
            args.out,
            parts=args.parts,
            seed=args.seed,
            skip_invalid=args.skip_invalid,
            chat=args.chat,
        )
        for name, (prompts, pairs) in counts.items():
            print(f"{name}: {pairs} pairs of {prompts} prompts -> {args.out}/{name}.jsonl")
        return
    filters = {k: getattr(args, k) for k in api.FILTERS}
    result = api.filter(args.data, args.out, model=args.model, seed=args.seed, **filters)
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
    from datetime import datetime

    from dpokit.rundir import Run

    settings = {f.name: getattr(args, f.name) for f in dataclasses.fields(api.EvalSettings)}
    out = args.out
    if out is None and not Run(args.target).exists:  # a model's results need a folder of their own
        out = datetime.now().strftime("eval-%Y%m%d-%H%M%S")
    result = api.evaluate(
        args.target,
        data=args.data,
        prompts=args.prompts,
        reward=args.reward,
        ref=args.ref,
        split=args.split,
        out=out,
        lambdas=args.lambdas,
        **settings,
    )
    if args.json:
        print(
            json.dumps(
                {
                    k: v
                    for k, v in result.results.items()
                    if k in ("preference", "generation", "interpolation")
                },
                indent=2,
            )
        )
    else:
        print(result.text())
    print(f"results: {result.path}")


def cmd_export(args, flags) -> None:
    done = api.export(
        args.target, args.out, dtype=args.dtype, gguf=args.gguf, gguf_type=args.gguf_type, lam=args.lam
    )
    print(f"exported: {done.source}")
    print(f"merged model: {done.folder}")
    if done.gguf:
        print(f"GGUF ({args.gguf_type}): {done.gguf}   Ollama: ollama create NAME -f {done.modelfile}")
    print(f"export took {done.seconds:.1f} s")


def cmd_report(args, flags) -> None:
    from dpokit.rundir import Run

    print(f"report: {Run(args.run_dir).report(args.out)}")


COMMANDS = {
    "train": cmd_train,
    "train-rm": cmd_train_rm,
    "iterate": cmd_iterate,
    "precompute-ref": cmd_precompute,
    "data": cmd_data,
    "demo": cmd_demo,
    "eval": cmd_eval,
    "report": cmd_report,
    "export": cmd_export,
    "label": cmd_label,
}


if __name__ == "__main__":
    launch.exit_process(main())
