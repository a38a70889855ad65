"""Command line: parses arguments and calls the public API; nothing else lives here."""

from __future__ import annotations

import argparse
import logging
import sys

from dpokit.config import ConfigError, help_text, load_config
from dpokit.data import DataError
from dpokit.models import ModelLoadError

USER_ERRORS = (ConfigError, DataError, ModelLoadError, FileNotFoundError)


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
    r = sub.add_parser(
        "precompute-ref",
        help="compute the reference log-probs of a training config once and cache them on disk",
        formatter_class=fmt,
        epilog="Training with train.precompute_ref=true and the same model, data and settings reuses the cache.",
    )
    r.add_argument("config", nargs="?", help="YAML config file")
    r.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.max_length=512")
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
    try:
        if args.command in ("train", "precompute-ref"):
            from dpokit.train import precompute_reference, train

            config, overrides = args.config, list(args.overrides)
            if config and "=" in config:  # only overrides were given
                config, overrides = None, [config, *overrides]
            cfg = load_config(config, overrides + flags)
            if args.command == "train":
                print(f"run dir: {train(cfg).run_dir}")
            else:
                for path in precompute_reference(cfg):
                    print(f"reference log-probs: {path}")
        elif args.command == "demo":
            from dpokit.demo import run_demo, summary_lines

            result = run_demo(list(args.overrides) + flags)
            print("\n".join(summary_lines(result)))
    except USER_ERRORS as err:
        print(f"dpokit {args.command}: error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:
        from dpokit.train import TrainingError

        if not isinstance(err, TrainingError):
            raise
        print(f"dpokit {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
