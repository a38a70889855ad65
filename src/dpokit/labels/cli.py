"""`dpokit label serve | export | stats`: the command line of the labeling folder (labels/__init__.py)."""

from __future__ import annotations

import argparse
import os
import sys

from dpokit import labels
from dpokit.labels.results import FORMATS


def add_label_parser(sub) -> None:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    label = sub.add_parser(
        "label", help="collect preferences: a local web page where people choose between two samples"
    ).add_subparsers(dest="label_command", required=True)
    s = label.add_parser(
        "serve",
        help="serve the labeling page of FOLDER (adding comparisons from --data, or sampled from --model)",
        formatter_class=fmt,
        description="Keys on the page: a / b (or the arrows) for the better side, t tie, x both bad, s skip, "
        "u undo, c comment. Every vote is committed before the next comparison is shown.",
    )
    s.add_argument(
        "folder", help="labeling folder (FOLDER/labels.sqlite), or an iterate run with judge=human"
    )
    s.add_argument("--data", help="comparisons: JSONL of prompt + completions (a list), or chosen/rejected")
    s.add_argument("--model", help="sample the completions from this model, folder or run")
    s.add_argument("--prompts", help="prompts to sample (with --model): any file with a prompt field")
    s.add_argument("--samples", type=int, default=2, help="completions per prompt (with --model)")
    s.add_argument("--num-prompts", type=int, default=0, help="prompts sampled (0 = all)")
    s.add_argument("--max-new-tokens", type=int, default=64, help="longest sampled completion")
    s.add_argument("--seed", type=int, default=0, help="sampling seed")
    s.add_argument("--overlap", type=int, help="annotators per comparison (kept in the folder; default 1)")
    s.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (others than loopback need --token)"
    )
    s.add_argument("--port", type=int, default=8765, help="port (0 = any free one)")
    s.add_argument("--token", help=f"access token the page's link carries (default ${labels.TOKEN_ENV})")
    e = label.add_parser("export", help="write the labels as a file dpokit trains on", formatter_class=fmt)
    e.add_argument("folder", help="labeling folder")
    e.add_argument("out", help="output JSONL file")
    e.add_argument(
        "--format",
        choices=FORMATS,
        default="pairs",
        help="pairs: prompt/chosen/rejected by majority; votes: one vote per annotator (data.min_agreement)",
    )
    st = label.add_parser("stats", help="print progress, each annotator's votes and their agreement")
    st.add_argument("folder", help="labeling folder")


def cmd_label(args, flags) -> None:
    if args.label_command == "export":
        counts = labels.export(args.folder, args.out, args.format)
        left_out = ", ".join(
            f"{counts[k]} {k.replace('_', ' ')}" for k in ("tie", "both_bad", "no_majority", "unlabeled")
        )
        print(f"{counts['written']} records -> {args.out} ({args.format}); left out: {left_out}")
        return
    if args.label_command == "stats":
        print_stats(labels.stats(args.folder))
        return
    token = args.token if args.token is not None else os.environ.get(labels.TOKEN_ENV, "")
    from dpokit.labels.app import bind

    # a busy port or a missing token is said before anything is written
    bind(args.host, args.port, token).close()
    given = ("data", "model", "prompts", "samples", "max_new_tokens", "seed", "num_prompts", "overlap")
    added = labels.prepare(args.folder, **{name: getattr(args, name) for name in given})
    print(
        f"{added['folder']}: {added['comparisons']} comparisons ({added['new']} new; {added['identical']} pairs of "
        f"identical texts left out)"
    )
    try:
        labels.serve(
            args.folder,
            args.host,
            args.port,
            token,
            ready=lambda url: print(
                f"open {url} to label (Ctrl-C stops; every vote is saved as it is cast)", flush=True
            ),
        )
    except KeyboardInterrupt:  # uvicorn raises the Ctrl-C again once it has shut down: nothing is lost
        print("stopped (Ctrl-C); every vote is saved")
    print_stats(labels.stats(args.folder))


def print_stats(s: dict) -> None:
    print(
        f"{s['complete']} of {s['comparisons']} comparisons complete ({s['overlap']} annotator(s) each), {s['votes']} votes"
    )
    for who, c in s["annotators"].items():
        ag = s["agreement"]["annotators"].get(who)
        shared = f", agreement with others {ag['agreement']:.3f} on {ag['shared']}" if ag else ""
        print(f"  {who}: {c['votes']} votes ({c.get('skip', 0)} skipped){shared}")
    for p in s["agreement"]["pairs"]:
        print(f"  {' & '.join(p['annotators'])}: agree on {p['agreement']:.3f} of {p['shared']} shared")
    sys.stdout.flush()
