"""Terminal rendering of a `dpokit data check` report (rich tables)."""

from __future__ import annotations

MAX_SHOWN = 10


def render(report: dict, console) -> None:
    from rich.table import Table

    t = Table(title=f"{report['file']}  ({report['kind']}, {report['seconds']:.1f} s)", show_header=False)
    t.add_column("what", style="bold")
    t.add_column("value")
    t.add_row("records / valid", f"{report['records']} / {report['valid']}")
    t.add_row("formats", ", ".join(f"{k}: {v}" for k, v in report["formats"].items()) or "-")
    inv = report["invalid"]
    t.add_row(
        "invalid",
        f"{inv['count']}"
        + (f"  ({'; '.join(f'{k}: {v}' for k, v in inv['reasons'].items())})" if inv["count"] else ""),
    )
    t.add_row("empty completions", str(report["empty_completions"]))
    tools = report.get("tools", {})
    if tools.get("records"):
        t.add_row(
            "tool use",
            f"{tools['records']} records: {tools['tool_calls']} completions call tools, "
            f"{tools['with_schemas']} carry a tools column",
        )
    multi = report.get("multi_message_completions", {})
    if multi.get("completions"):
        t.add_row("completions of several messages", f"{multi['completions']}: trained on {multi['trained']}")
    if report.get("weights"):
        w = report["weights"]
        t.add_row(
            "weights in use",
            f"{w['weighted']} of {w['of']} pairs weigh != 1 (min {w['min']:g}, max {w['max']:g}, mean {w['mean']:.3f})",
        )
    rp = report["repeated_prompts"]
    t.add_row("repeated prompts", f"{rp['prompts']} prompts in {rp['examples']} examples")
    if report["kind"] == "paired":
        if report["ties"]:
            t.add_row("annotator ties", f"{report['ties']}  (no preference: dropped before training)")
        t.add_row("duplicate pairs", str(report["duplicate_pairs"]))
        t.add_row("chosen == rejected", str(report["identical_pairs"]))
        sim = report["similarity"]
        q = sim["quantiles"]
        if q:
            t.add_row(
                "similarity (Dice)", f"median {q['median']:.3f}, p95 {q['p95']:.3f}, max {q['max']:.3f}"
            )
            t.add_row(f"  > {sim['threshold']}", str(sim["above_threshold"]))
            t.add_row("  histogram", "  ".join(f"{k} {v}" for k, v in sim["histogram"].items()))
        ln = report["length"]
        if ln:
            t.add_row(
                "length bias",
                f"chosen longer in {ln['chosen_longer_share']:.1%}, mean diff {ln['mean_difference']:+.1f}, "
                f"median diff {ln['median_difference']:+.1f} tokens, r = {ln['correlation']:+.3f}",
            )
        if "truncation" in report:
            tr = report["truncation"]
            t.add_row(
                f"truncation @ {tr['max_length']}/{tr['max_prompt_length']}",
                f"{tr['prompts_truncated']} prompts cut, {tr['completions_truncated']} pairs with a completion cut, "
                f"{sum(tr['dropped'].values())} pairs dropped",
            )
        if "agreement" in report:
            ag = report["agreement"]
            t.add_row(
                "annotator agreement",
                ", ".join(f"{k}: {v}" for k, v in ag["distribution"].items()) + f" (mean {ag['mean']:.3f})",
            )
        for who, ag in (report.get("annotators") or {}).get("annotators", {}).items():
            t.add_row(
                f"  {who}", f"agrees with the others on {ag['agreement']:.3f} of {ag['shared']} shared votes"
            )
        if "score_gap" in report:
            sg = report["score_gap"]
            t.add_row(
                "score gap", f"median {sg['quantiles']['median']:.3f}, non-positive {sg['non_positive']}"
            )
        if "confidence" in report:
            t.add_row("confidence", f"median {report['confidence']['quantiles']['median']:.3f}")
    else:
        lab = report["labels"]
        t.add_row("labels", f"desirable {lab['desirable']}, undesirable {lab['undesirable']}")
        t.add_row("duplicate examples", str(report["duplicate_examples"]))
    console.print(t)
    first = report["invalid"]["first"]
    if first:
        console.print(
            f"invalid records (first {min(len(first), MAX_SHOWN)} of {report['invalid']['count']}):",
            highlight=False,
        )
        for line in first[:MAX_SHOWN]:
            console.print(f"  {line}", highlight=False, soft_wrap=True)
    for tip in report["advice"]:
        console.print(f"[yellow]advice:[/yellow] {tip}", highlight=False)
    if not report["advice"]:
        console.print("[green]no problems found[/green]")
