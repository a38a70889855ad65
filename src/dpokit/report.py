"""`dpokit report RUN_DIR`: one self-contained HTML page (plotly.js inlined, works offline).

Everything shown is read from files the run dir already holds, through rundir.Run: the metrics (curves), the
pair samples (the log-ratio picture of real held-out pairs), the config, the summary (why the run stopped),
the data stats and data check, the eval results and samples (`dpokit eval` or the demo), the frontier
(`dpokit demo --sweep`) and an iterate run's rounds. Missing files leave their section out.

Figures are built with plotly in Python and drawn by plotly.js in the page; the loss explorer evaluates the
loss formulas of docs/losses.md in JavaScript (the browser test checks it against dpokit.losses).
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from dpokit.errors import UsageError
from dpokit.rundir import Run

# Loss types the explorer can evaluate from (chosen, rejected) inputs; the others fall back to sigmoid.
EXPLORER_LOSSES = (
    "sigmoid",
    "robust",
    "hinge",
    "exo_pair",
    "ipo",
    "sigmoid_norm",
    "nca_pair",
    "bco_pair",
    "sppo_hard",
    "apo_zero",
    "apo_down",
    "discopop",
    "simpo",
)
CURVES = [
    ("loss", "Loss", ["loss"]),
    ("rewards", "Rewards: chosen and rejected", ["rewards/chosen", "rewards/rejected"]),
    ("margins", "Reward margin (chosen - rejected)", ["rewards/margins"]),
    ("accuracies", "Preference accuracy", ["rewards/accuracies"]),
    (
        "drift",
        "Drift from the reference (nats per token)",
        ["drift/abs_logratio_per_token", "drift/kl_chosen_per_token"],
    ),
    ("lr", "Learning rate", ["lr"]),
    ("grad_norm", "Gradient norm (before clipping)", ["grad_norm"]),
    ("tokens_per_s", "Throughput (tokens/s)", ["tokens_per_s"]),
]
COLORS = {"chosen": "#2a9d8f", "rejected": "#e76f51", "train": "#264653", "eval": "#e9c46a"}


def collect(run: Run | Path) -> dict:
    """Everything the report shows, from the run dir's files."""
    import yaml

    run = run if isinstance(run, Run) else Run(run)
    config_text = run.config_text
    return {
        "name": run.path.resolve().name,
        "config_text": config_text,
        "config": yaml.safe_load(config_text) if config_text else {},
        "metrics": run.metrics,
        "pair_samples": run.pair_samples,
        "summary": run.summary,
        "data_stats": run.data_stats,
        "data_check": run.data_check,
        "eval": run.eval_results,
        "eval_samples": run.eval_samples,
        "frontier": run.frontier,
        **_rounds(run),
    }


def _rounds(run: Run) -> dict:
    """An iterate run: its rounds, and their training metrics on one step axis (round r's steps follow
    round r - 1's), each record tagged with its round."""
    rounds = (run.iterate_summary or {}).get("rounds")
    if not rounds:
        return {"rounds": None}
    metrics, offset = [], 0
    for summary in rounds:
        records = run.round(summary["round"]).train.history
        metrics += [{**r, "step": r["step"] + offset, "round": summary["round"]} for r in records]
        offset += summary["train"]["steps"]
    return {"rounds": rounds, "metrics": metrics}


# --- figures ------------------------------------------------------------------------------------------


def _layout(fig: go.Figure, title: str, y: str = "", x: str = "step") -> go.Figure:
    fig.update_layout(
        title=title,
        template="plotly_white",
        height=320,
        margin=dict(l=50, r=20, t=50, b=40),
        legend=dict(orientation="h", y=-0.25),
        xaxis_title=x,
        yaxis_title=y,
    )
    return fig


def curve_figures(metrics: list[dict]) -> dict[str, go.Figure]:
    figs = {}
    for name, title, keys in CURVES:
        fig = go.Figure()
        for key in keys:
            side = "chosen" if key.endswith("chosen") else "rejected" if key.endswith("rejected") else None
            train = [(r["step"], r[key]) for r in metrics if key in r and _finite(r[key])]
            ev = [
                (r["step"], r[f"eval/{key}"])
                for r in metrics
                if f"eval/{key}" in r and _finite(r[f"eval/{key}"])
            ]
            for label, pts, dash, mode in (
                ("train", train, None, "lines"),
                ("eval", ev, "dot", "lines+markers"),
            ):
                if not pts:
                    continue
                color = COLORS[side] if side else COLORS[label]
                fig.add_trace(
                    go.Scatter(
                        x=[p[0] for p in pts],
                        y=[p[1] for p in pts],
                        mode=mode,
                        name=f"{label} {key}",
                        line=dict(color=color, dash=dash),
                    )
                )
        if fig.data:
            figs[name] = _layout(fig, title)
    return figs


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def _sigmoid(z: float) -> float:
    return 1 / (1 + math.exp(-z)) if z >= 0 else math.exp(z) / (1 + math.exp(z))


def pair_figure(pair_samples: list[dict], beta: float) -> tuple[go.Figure | None, list[dict]]:
    """Bars of log(pi/pi_ref) for chosen and rejected of sampled held-out pairs, at the first and last
    evaluation; rows for the table (margin, beta*margin, sigma, loss)."""
    usable = [s for s in pair_samples if s["pairs"] and "logratio_chosen" in s["pairs"][0]]
    if not usable:
        return None, []
    moments = [usable[0], usable[-1]] if len(usable) > 1 else usable
    fig = make_subplots(
        rows=1,
        cols=len(moments),
        shared_yaxes=True,
        subplot_titles=[
            f"step {m['step']}" + (" (start)" if i == 0 else " (end)") for i, m in enumerate(moments)
        ],
    )
    rows = []
    for col, m in enumerate(moments, start=1):
        labels = [f"pair {p['index']}" for p in m["pairs"]]
        for side in ("chosen", "rejected"):
            fig.add_trace(
                go.Bar(
                    x=labels,
                    y=[p[f"logratio_{side}"] for p in m["pairs"]],
                    name=f"log pi/pi_ref {side}",
                    marker_color=COLORS[side],
                    showlegend=col == 1,
                    legendgroup=side,
                ),
                row=1,
                col=col,
            )
        for p in m["pairs"]:
            margin = p["logratio_chosen"] - p["logratio_rejected"]
            rows.append(
                {
                    "step": m["step"],
                    "pair": p["index"],
                    "log-ratio chosen": p["logratio_chosen"],
                    "log-ratio rejected": p["logratio_rejected"],
                    "margin": margin,
                    "beta*margin": beta * margin,
                    "sigma(beta*margin)": _sigmoid(beta * margin),
                    "loss": p["loss"],
                    "prompt": p.get("prompt", ""),
                    "chosen": p.get("chosen", ""),
                    "rejected": p.get("rejected", ""),
                }
            )
    fig.update_layout(barmode="group")
    return _layout(fig, "log(pi/pi_ref) of held-out pairs, start vs end", "nats", "pair"), rows


def frontier_figure(points: list[dict]) -> go.Figure:
    fig = go.Figure()
    symbols = {"DPO": "circle", "Preferred-FT": "square", "Best-of-N": "diamond", "Iterative DPO": "star"}
    for method in dict.fromkeys(p["method"] for p in points):
        pts = sorted((p for p in points if p["method"] == method), key=lambda p: p["kl"])
        fig.add_trace(
            go.Scatter(
                x=[p["kl"] for p in pts],
                y=[p["reward"] for p in pts],
                mode="lines+markers+text" if len(pts) > 1 else "markers+text",
                text=[p["label"] for p in pts],
                textposition="top center",
                name=method,
                marker=dict(size=11, symbol=symbols.get(method, "circle")),
                error_y=dict(type="data", array=[p.get("reward_stderr", 0) for p in pts], visible=True),
            )
        )
    fig = _layout(
        fig,
        "Reward vs KL(policy || reference) on held-out prompts",
        "mean reward",
        "KL (nats per completion)",
    )
    fig.update_layout(height=420)
    return fig


def reward_histogram(samples: list[dict]) -> go.Figure | None:
    pol = [v for r in samples for v in r.get("reward_policy", [])]
    ref = [v for r in samples for v in r.get("reward_reference", [])]
    if not pol:
        return None
    fig = go.Figure()
    fig.add_trace(
        go.Histogram(x=ref, name="reference", opacity=0.6, marker_color=COLORS["rejected"], nbinsx=30)
    )
    fig.add_trace(go.Histogram(x=pol, name="policy", opacity=0.6, marker_color=COLORS["chosen"], nbinsx=30))
    fig.update_layout(barmode="overlay")
    return _layout(fig, "Reward of sampled completions on held-out prompts", "completions", "reward")


# --- page ---------------------------------------------------------------------------------------------


def _table(rows: list[dict] | dict, limit: int | None = None) -> str:
    if isinstance(rows, dict):
        rows = [{"key": k, "value": v} for k, v in rows.items()]
    rows = rows[:limit] if limit else rows
    if not rows:
        return "<p class='muted'>none</p>"
    cols = list(dict.fromkeys(k for r in rows for k in r))
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{_cell(r.get(c, ''))}</td>" for c in cols) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (dict, list)):
        v = json.dumps(v, ensure_ascii=False)
    return html.escape(str(v))


def _script_json(obj) -> str:
    """JSON safe inside a <script> element."""
    return json.dumps(obj, default=str).replace("</", "<\\/")


class Figures:
    """The page's plotly figures, by name: each section places a div, the page script draws them."""

    def __init__(self):
        self.specs: dict[str, dict] = {}

    def __call__(self, name: str, fig: go.Figure) -> str:
        self.specs[name] = json.loads(fig.to_json())
        return f"<div class='chart' id='chart-{name}'></div>"


def build_html(data: dict) -> str:
    """The page: one section per kind of evidence the run dir holds."""
    from plotly.offline import get_plotlyjs

    loss_cfg = (data["config"] or {}).get("loss", {}) or {}
    loss_types = loss_cfg.get("type", ["sigmoid"]) or ["sigmoid"]
    beta = float(loss_cfg.get("beta", 0.1))
    figure = Figures()
    sections = [
        _run_section(data, loss_types, beta),
        _rounds_section(data.get("rounds"), figure),
        _eval_section(data["eval"] or {}, data["eval_samples"], figure),
        _frontier_section(data["frontier"], figure),
        _curves_section(data["metrics"], figure),
        _pairs_section(data["pair_samples"], beta, figure),
        _explorer_section(loss_types),
        _samples_section(data["eval_samples"]),
        _data_section(data["data_check"], data["data_stats"]),
    ]
    if data["config_text"]:
        sections.append(
            f"<section><h2>Resolved config</h2><pre>{html.escape(data['config_text'])}</pre></section>"
        )
    explorer_type = loss_types[0] if loss_types[0] in EXPLORER_LOSSES else "sigmoid"
    params = {
        k: loss_cfg.get(k)
        for k in ("label_smoothing", "simpo_gamma", "discopop_tau", "f_divergence", "f_alpha")
    }
    return PAGE.format(
        title=html.escape(f"dpokit report: {data['name']}"),
        plotly=get_plotlyjs(),
        body="\n".join(x for x in sections if x),
        figures=_script_json(figure.specs),
        explorer=_script_json(
            {"type": explorer_type, "beta": beta, **{k: v for k, v in params.items() if v is not None}}
        ),
        script=EXPLORER_JS,
    )


def _run_section(data: dict, loss_types: list[str], beta: float) -> str:
    summary = data["summary"] or {}
    overview = {
        "run": data["name"],
        "loss": " + ".join(loss_types),
        "beta": beta,
        "steps": summary.get("steps"),
        "stopped": summary.get("stopped"),
        "wall time (s)": summary.get("wall_s"),
        "peak RSS (MiB)": summary.get("peak_rss_mib"),
    }
    warn = "".join(f"<li>{html.escape(str(w))}</li>" for w in summary.get("warnings", []) or [])
    return (
        "<section><h2>Run</h2>"
        + _table({k: v for k, v in overview.items() if v is not None})
        + (f"<h3>Warnings</h3><ul>{warn}</ul>" if warn else "")
        + "</section>"
    )


HEADLINE = (
    "reward/gain",
    "win_rate",
    "kl/sequence",
    "kl/sequence_stderr",
    "kl/token",
    "length/drift",
    "prompts",
    "samples_per_prompt",
)


def _eval_section(ev: dict, eval_samples, figure: Figures) -> str:
    if not ev:
        return ""
    parts = []
    gen = ev.get("generation")
    if gen:
        rows = [
            {"": "policy", **{k: gen.get(f"{k}/policy") for k in ("reward", "length", "finished")}},
            {"": "reference", **{k: gen.get(f"{k}/reference") for k in ("reward", "length", "finished")}},
        ]
        parts.append(
            "<h3>Sampled completions on held-out prompts: policy vs reference</h3>"
            + _table(rows)
            + _table({k: gen[k] for k in HEADLINE if k in gen})
            + f"<p class='muted'>sampling: {html.escape(json.dumps(gen.get('sampling', {})))}</p>"
        )
    before, after = ev.get("preference_before"), ev.get("preference_after")
    if before and after:
        rows = [{"metric": k, "before": before[k], "after": after.get(k, "")} for k in before]
        parts.append("<h3>Held-out pairs, before and after training</h3>" + _table(rows))
    elif ev.get("preference"):
        parts.append("<h3>Held-out pairs</h3>" + _table(ev["preference"]))
    hist = reward_histogram(eval_samples)
    if hist is not None:
        parts.append(figure("reward_hist", hist))
    return "<section><h2>Evaluation</h2>" + "".join(parts) + "</section>"


ROUND_COLUMNS = {
    "pairs": ("data", "pairs"),
    "ties dropped": ("data", "ties_dropped"),
    "sample score": ("data", "score/mean"),
    "pair margin": ("data", "score_margin/mean"),
    "EOS share": ("data", "eos_share"),
    "train loss": ("train", "final_train", "loss"),
    "train margin": ("train", "final_train", "rewards/margins"),
    "held-out reward": ("eval", "reward/policy"),
    "win vs initial": ("eval", "win_rate/initial"),
    "win vs previous": ("eval", "win_rate/previous"),
    "KL (seq)": ("eval", "kl/sequence"),
    "KL (token)": ("eval", "kl/token"),
    "length": ("eval", "length/policy"),
    "EOS (held-out)": ("eval", "finished/policy"),
}


def _dig(d, path):
    for key in path:
        d = d.get(key) if isinstance(d, dict) else None
    return d


def rounds_figure(rounds: list[dict]) -> go.Figure | None:
    """Held-out reward and KL to the initial model, round by round."""
    done = [r for r in rounds if r.get("eval")]
    if not done:
        return None
    fig = go.Figure()
    x = [r["round"] for r in done]
    fig.add_trace(
        go.Scatter(
            x=x, y=[r["eval"]["reward/policy"] for r in done], name="held-out reward", mode="lines+markers"
        )
    )
    fig.add_trace(
        go.Scatter(
            x=x,
            y=[r["eval"]["kl/sequence"] for r in done],
            name="KL to initial (nats)",
            mode="lines+markers",
            yaxis="y2",
        )
    )
    fig.add_hline(y=done[0]["eval"]["reward/reference"], line_dash="dot", annotation_text="initial model")
    fig = _layout(fig, "Rounds: held-out reward and KL", "reward", "round")
    fig.update_layout(yaxis2=dict(title="KL (nats)", overlaying="y", side="right"))
    return fig


def _rounds_section(rounds, figure: Figures) -> str:
    if not rounds:
        return ""
    rows = [{"round": r["round"], **{k: _dig(r, path) for k, path in ROUND_COLUMNS.items()}} for r in rounds]
    fig = rounds_figure(rounds)
    return (
        "<section><h2>Rounds (on-policy DPO)</h2>"
        + _table(rows)
        + (figure("rounds", fig) if fig is not None else "")
        + "<p class='muted'>Each round samples from the policy the previous round trained, scores, pairs and "
        "trains; the curves below run over all rounds (round r's steps follow round r - 1's). Each round's "
        "files are in rounds/R/.</p></section>"
    )


def _frontier_section(frontier, figure: Figures) -> str:
    if not frontier:
        return ""
    return (
        "<section><h2>Reward vs KL frontier</h2>"
        + figure("frontier", frontier_figure(frontier))
        + _table(frontier)
        + "<p class='muted'>DPO and preferred-FT: sampled KL; best-of-N: the "
        "analytic bound log N - (N-1)/N.</p></section>"
    )


def _curves_section(metrics, figure: Figures) -> str:
    curves = curve_figures(metrics)
    if not curves:
        return ""
    return (
        "<section><h2>Training curves</h2><div class='grid'>"
        + "".join(figure(n, f) for n, f in curves.items())
        + "</div></section>"
    )


def _pairs_section(pair_samples, beta: float, figure: Figures) -> str:
    pair_fig, pair_rows = pair_figure(pair_samples, beta)
    if pair_fig is None:
        return ""
    table_rows = [
        {k: v for k, v in r.items() if k not in ("prompt", "chosen", "rejected")} for r in pair_rows
    ]
    texts = {r["pair"]: r for r in pair_rows}
    text_rows = [
        {
            "pair": i,
            "prompt": r["prompt"][-300:],
            "chosen": r["chosen"][:300],
            "rejected": r["rejected"][:300],
        }
        for i, r in texts.items()
    ]
    return (
        "<section><h2>Log-ratios of real held-out pairs</h2>"
        + figure("pairs", pair_fig)
        + _table(table_rows)
        + "<details><summary>the pairs</summary>"
        + _table(text_rows)
        + "</details></section>"
    )


def _explorer_section(loss_types: list[str]) -> str:
    explorer_type = loss_types[0] if loss_types[0] in EXPLORER_LOSSES else "sigmoid"
    note = ""
    if explorer_type != loss_types[0]:
        note = f"<p class='muted'>{html.escape(loss_types[0])} is not a function of two log-ratios alone; showing sigmoid.</p>"
    if len(loss_types) > 1:
        note += "<p class='muted'>The run combines several losses; the explorer shows the first.</p>"
    options = "".join(
        f"<option value='{t}'{' selected' if t == explorer_type else ''}>{t}</option>"
        for t in EXPLORER_LOSSES
    )
    return EXPLORER_HTML.format(note=note, options=options)


def _samples_section(eval_samples) -> str:
    if not eval_samples:
        return ""
    rows = []
    for r in eval_samples[:12]:
        prompt = r["prompt"] if isinstance(r["prompt"], str) else json.dumps(r["prompt"], ensure_ascii=False)
        for k, (p, q) in enumerate(zip(r["policy"], r["reference"], strict=False)):
            rows.append(
                {
                    "prompt": prompt if k == 0 else "",
                    "policy": p,
                    "reward (policy)": r["reward_policy"][k],
                    "reference": q,
                    "reward (reference)": r["reward_reference"][k],
                }
            )
    return "<section><h2>Sample generations</h2>" + _table(rows) + "</section>"


def _data_section(data_check, data_stats) -> str:
    parts = []
    if data_check:
        parts.append("<h3>Data check</h3>" + _table(_flatten(data_check)))
    if data_stats:
        parts.append("<h3>Loading and tokenization</h3>" + _table(_flatten(data_stats)))
    return "<section><h2>Data</h2>" + "".join(parts) + "</section>" if parts else ""


def _flatten(d, prefix: str = "") -> dict:
    out = {}
    for k, v in (d or {}).items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def write_report(run_dir, out: str | Path | None = None) -> Path:
    """Write the report of a run dir to `out` (default: the run's report page); returns its path."""
    run = Run(run_dir)
    if not run.path.is_dir():
        raise UsageError(f"{run.path}: no such run dir")
    data = collect(run)
    if not data["metrics"] and not data["eval"]:
        raise UsageError(f"{run.path}: nothing to report (no metrics or eval results); is this a run dir?")
    path = Path(out) if out else run.report_path
    path.write_text(build_html(data), encoding="utf-8")
    return path


EXPLORER_HTML = """<section id="explorer"><h2>Loss explorer</h2>{note}
<div class="explorer"><div class="controls">
<label>loss type <select id="x-type">{options}</select></label>
<label><span id="x-chosen-label">chosen log-ratio</span> <input type="range" id="x-chosen" min="-10" max="10" step="0.05" value="1"> <output id="v-chosen"></output></label>
<label><span id="x-rejected-label">rejected log-ratio</span> <input type="range" id="x-rejected" min="-10" max="10" step="0.05" value="-1"> <output id="v-rejected"></output></label>
<label>beta <input type="range" id="x-beta" min="0.01" max="2" step="0.01" value="0.1"> <output id="v-beta"></output></label>
<table class="readout"><tbody>
<tr><td>margin h</td><td id="out-margin"></td></tr>
<tr><td>beta * h</td><td id="out-zmargin"></td></tr>
<tr><td>sigma(beta * h)</td><td id="out-sigma"></td></tr>
<tr><td>loss</td><td id="out-loss"></td></tr></tbody></table>
<p class="muted" id="x-formula"></p></div>
<div class="chart" id="chart-explorer"></div></div></section>"""

EXPLORER_JS = r"""
const logsig = z => (z >= 0 ? -Math.log1p(Math.exp(-z)) : z - Math.log1p(Math.exp(z)));
const sig = z => (z >= 0 ? 1 / (1 + Math.exp(-z)) : Math.exp(z) / (1 + Math.exp(z)));
const softplus = z => (z > 0 ? z + Math.log1p(Math.exp(-z)) : Math.log1p(Math.exp(z)));
const cexp = v => Math.exp(Math.min(v, 80));
function prefLogits(c, r, p) {
  const a = p.f_alpha ?? 1;
  switch (p.f_divergence || "reverse_kl") {
    case "forward_kl": return cexp(-r) - cexp(-c);
    case "js_divergence": return (c - r) - (softplus(c) - softplus(r));
    case "alpha_divergence": return (cexp(-a * r) - cexp(-a * c)) / a;
    default: return c - r;
  }
}
const smoothed = (z, e) => -(1 - e) * logsig(z) - e * logsig(-z);
// c, r: log-ratios (per token for ipo / sigmoid_norm; average log-probs for simpo); same formulas as dpokit.losses
const LOSS = {
  sigmoid: (c, r, b, p) => smoothed(b * prefLogits(c, r, p), p.label_smoothing || 0),
  robust: (c, r, b, p) => { const z = b * prefLogits(c, r, p), e = p.label_smoothing || 0;
    return (-(1 - e) * logsig(z) + e * logsig(-z)) / (1 - 2 * e); },
  hinge: (c, r, b, p) => Math.max(0, 1 - b * prefLogits(c, r, p)),
  exo_pair: (c, r, b, p) => { const z = b * prefLogits(c, r, p), e = p.label_smoothing || 1e-3;
    return sig(z) * (logsig(z) - Math.log(1 - e)) + sig(-z) * (logsig(-z) - Math.log(e)); },
  ipo: (c, r, b) => (c - r - 1 / (2 * b)) ** 2,
  sigmoid_norm: (c, r, b, p) => smoothed(b * (c - r), p.label_smoothing || 0),
  nca_pair: (c, r, b) => -logsig(b * c) - 0.5 * logsig(-b * c) - 0.5 * logsig(-b * r),
  bco_pair: (c, r, b) => -logsig(b * c) - logsig(-(b * r)),
  sppo_hard: (c, r, b) => (c - 0.5 / b) ** 2 + (r + 0.5 / b) ** 2,
  apo_zero: (c, r, b) => 1 - sig(b * c) + sig(b * r),
  apo_down: (c, r, b) => sig(b * c) + 1 - sig(b * (c - r)),
  discopop: (c, r, b, p) => { const z = b * (c - r), m = sig(z / (p.discopop_tau ?? 0.05));
    return (1 - m) * -logsig(z) + m * Math.exp(-z); },
  simpo: (c, r, b, p) => smoothed(b * (c - r) - (p.simpo_gamma ?? 0.5), p.label_smoothing || 0),
};
const INPUTS = { ipo: "per-token log-ratio", sigmoid_norm: "per-token log-ratio", simpo: "average log-prob" };
const FIGURES = JSON.parse(document.getElementById("figures").textContent);
const EXPLORER = JSON.parse(document.getElementById("explorer-params").textContent);
for (const [name, fig] of Object.entries(FIGURES)) {
  Plotly.newPlot("chart-" + name, fig.data, fig.layout, {responsive: true, displaylogo: false});
}
const $ = id => document.getElementById(id);
function explorerState() {
  return { type: $("x-type").value, c: +$("x-chosen").value, r: +$("x-rejected").value, b: +$("x-beta").value };
}
function lossValue(type, c, r, b) { return LOSS[type](c, r, b, EXPLORER); }
function updateExplorer() {
  const s = explorerState();
  const h = s.type === "simpo" || s.type === "ipo" || s.type === "sigmoid_norm" ? s.c - s.r : prefLogits(s.c, s.r, EXPLORER);
  const loss = lossValue(s.type, s.c, s.r, s.b);
  const what = INPUTS[s.type] || "log-ratio";
  $("x-chosen-label").textContent = "chosen " + what;
  $("x-rejected-label").textContent = "rejected " + what;
  $("v-chosen").textContent = s.c.toFixed(2);
  $("v-rejected").textContent = s.r.toFixed(2);
  $("v-beta").textContent = s.b.toFixed(2);
  $("out-margin").textContent = h.toFixed(4);
  $("out-zmargin").textContent = (s.b * h).toFixed(4);
  $("out-sigma").textContent = sig(s.b * h).toFixed(4);
  $("out-loss").textContent = loss.toFixed(6);
  const xs = [], ys = [];
  for (let x = -10; x <= 10.0001; x += 0.1) { xs.push(x); ys.push(lossValue(s.type, x, s.r, s.b)); }
  Plotly.react("chart-explorer", [
    {x: xs, y: ys, mode: "lines", name: "loss as the chosen input varies", line: {color: "#264653"}},
    {x: [s.c], y: [loss], mode: "markers", name: "current", marker: {size: 12, color: "#e76f51"}},
  ], {title: s.type + " loss (rejected input " + s.r.toFixed(2) + ", beta " + s.b.toFixed(2) + ")", template: "plotly_white",
      height: 320, margin: {l: 50, r: 20, t: 50, b: 40}, xaxis: {title: {text: "chosen " + what}}, yaxis: {title: {text: "loss"}},
      legend: {orientation: "h", y: -0.25}}, {displaylogo: false});
}
$("x-beta").value = Math.min(2, Math.max(0.01, EXPLORER.beta));
for (const id of ["x-type", "x-chosen", "x-rejected", "x-beta"]) $(id).addEventListener("input", updateExplorer);
updateExplorer();
window.dpokitLoss = lossValue;
"""

PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body {{ font-family: system-ui, sans-serif; margin: 0 auto; max-width: 1280px; padding: 0 24px 48px; color: #222; }}
h1 {{ font-size: 1.5rem; }} h2 {{ border-bottom: 1px solid #ddd; padding-bottom: 4px; margin-top: 36px; }}
table {{ border-collapse: collapse; font-size: 0.85rem; margin: 8px 0; }}
td, th {{ border: 1px solid #e3e3e3; padding: 3px 8px; text-align: left; vertical-align: top; max-width: 520px; }}
th {{ background: #f6f6f6; }} pre {{ background: #f6f6f6; padding: 12px; overflow-x: auto; }}
.grid {{ display: grid; grid-template-columns: repeat(auto-fill, minmax(560px, 1fr)); gap: 12px; }}
.explorer {{ display: grid; grid-template-columns: 360px 1fr; gap: 24px; align-items: start; }}
.controls label {{ display: block; margin: 10px 0; }} .controls input[type=range] {{ width: 200px; vertical-align: middle; }}
.muted {{ color: #777; font-size: 0.85rem; }}
</style>
<script>{plotly}</script>
</head><body>
<h1>{title}</h1>
{body}
<script type="application/json" id="figures">{figures}</script>
<script type="application/json" id="explorer-params">{explorer}</script>
<script>{script}</script>
</body></html>
"""
