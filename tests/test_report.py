"""`dpokit report`: a self-contained page from a real (tiny) run, checked in a real headless browser
(Debian's chromium): no console errors, every chart drawn, the loss explorer reacting to its sliders and
agreeing with dpokit.losses. Also: the log-ratio samples of held-out pairs and the Accelerate tracker sink."""

import json
import math
from pathlib import Path

import pytest
import torch

from dpokit.cli import main
from dpokit.files import read_jsonl as read_metrics
from dpokit.loop import train
from dpokit.losses import PairLogps, compute_loss
from dpokit.report import EXPLORER_LOSSES, write_report
from helpers import load_cfg


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model_dir):
    out = tmp_path_factory.mktemp("report") / "run"
    cfg = load_cfg(
        tiny_model_dir,
        out,
        "train.max_steps=4",
        "eval.every=2",
        "eval.sample_pairs=3",
        "train.save_final=true",
    )
    train(cfg)
    # generation results as `dpokit eval` writes them
    assert (
        main(
            [
                "eval",
                str(out),
                "--reward",
                "length:words",
                "--prompts",
                "builtin:reviews",
                "--split",
                "eval",
                "--num-prompts",
                "3",
                "--samples",
                "2",
                "--max-new-tokens",
                "5",
            ]
        )
        == 0
    )
    frontier = [
        {
            "method": "DPO",
            "label": "beta=0.1",
            "kl": 1.5,
            "reward": 0.4,
            "reward_stderr": 0.05,
            "kl_kind": "sampled",
        },
        {
            "method": "Best-of-N",
            "label": "N=2",
            "kl": math.log(2) - 0.5,
            "reward": 0.3,
            "reward_stderr": 0.05,
            "kl_kind": "analytic bound",
        },
    ]
    (out / "frontier.json").write_text(json.dumps(frontier))
    return out


@pytest.mark.slow
def test_pair_samples_hold_the_log_ratio_picture(run_dir):
    rows = read_metrics(run_dir / "pair_samples.jsonl")
    assert [r["step"] for r in rows] == [0, 2, 4]
    start = rows[0]["pairs"]
    assert len(start) == 3
    for p in start:  # policy == reference before training
        assert p["logratio_chosen"] == 0.0 and p["logratio_rejected"] == 0.0
        assert p["loss"] == pytest.approx(math.log(2))
        assert p["prompt"] and p["chosen"] and p["rejected"]
    end = rows[-1]["pairs"]
    metrics = read_metrics(run_dir / "metrics.jsonl")[-1]
    beta = 0.1
    for p in end:
        assert p["reward_chosen"] == pytest.approx(beta * p["logratio_chosen"], abs=1e-6)
        want = -torch.nn.functional.logsigmoid(
            torch.tensor(beta * (p["logratio_chosen"] - p["logratio_rejected"]))
        ).item()
        assert p["loss"] == pytest.approx(want, abs=1e-5)
    assert any(p["logratio_chosen"] != 0.0 for p in end) and "eval/loss" in metrics


@pytest.mark.slow
def test_report_is_self_contained(run_dir):
    path = write_report(run_dir)
    text = path.read_text()
    assert path == run_dir / "report.html" and len(text) > 1_000_000  # plotly.js is inlined
    for needle in (
        "Training curves",
        "Log-ratios of real held-out pairs",
        "Loss explorer",
        "Sample generations",
        "Resolved config",
        "Reward vs KL frontier",
        "chart-rewards",
        "chart-pairs",
        "completed all steps",
    ):
        assert needle in text, needle
    assert 'src="http' not in text and "<link" not in text  # nothing fetched from the network
    figures = json.loads(text.split('<script type="application/json" id="figures">')[1].split("</script>")[0])
    names = {t["name"] for t in figures["rewards"]["data"]}
    assert {
        "train rewards/chosen",
        "train rewards/rejected",
        "eval rewards/chosen",
        "eval rewards/rejected",
    } <= names


@pytest.mark.slow
def test_report_cli_and_errors(run_dir, tmp_path, capsys):
    out = tmp_path / "r.html"
    assert main(["report", str(run_dir), "--out", str(out)]) == 0 and out.is_file()
    assert main(["report", str(tmp_path)]) == 2
    assert "nothing to report" in capsys.readouterr().err


def _set_slider(drv, element_id: str, value: float) -> None:
    drv.execute_script(
        "const el = document.getElementById(arguments[0]); el.value = arguments[1];"
        "el.dispatchEvent(new Event('input', {bubbles: true}));",
        element_id,
        str(value),
    )


@pytest.mark.slow
def test_report_in_a_real_browser(run_dir, browser):
    path = write_report(run_dir)
    browser.get(Path(path).resolve().as_uri())
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors
    charts = browser.execute_script(
        "return [...document.querySelectorAll('.chart')].map(d => [d.id, d.querySelectorAll('.main-svg').length,"
        " d.querySelectorAll('.trace, .bars, .point').length])"
    )
    assert len(charts) >= 10
    for chart_id, svgs, marks in charts:
        assert svgs > 0 and marks > 0, f"{chart_id} did not render"
    before = browser.find_element("id", "out-loss").text
    _set_slider(browser, "x-chosen", 4.0)
    after = browser.find_element("id", "out-loss").text
    assert before != after
    c, r, beta = 4.0, float(browser.find_element("id", "x-rejected").get_attribute("value")), 0.1
    want = -torch.nn.functional.logsigmoid(torch.tensor(beta * (c - r), dtype=torch.float64)).item()
    assert float(after) == pytest.approx(want, abs=1e-6)
    assert float(browser.find_element("id", "out-sigma").text) == pytest.approx(
        1 / (1 + math.exp(-beta * (c - r))), abs=1e-4
    )


@pytest.mark.slow
@pytest.mark.parametrize("f_div", ["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"])
def test_explorer_formulas_match_dpokit_losses(run_dir, browser, f_div):
    """The page's JavaScript losses against the PyTorch ones (lengths 1, so per-token inputs coincide)."""
    browser.get(write_report(run_dir).resolve().as_uri())
    params = {
        "label_smoothing": 0.1,
        "simpo_gamma": 0.5,
        "discopop_tau": 0.05,
        "f_divergence": f_div,
        "f_alpha": 0.5,
        "beta": 0.3,
        "bco_delta": 0.0,
        "orpo_lambda": 0.1,
        "cpo_alpha": 1.0,
    }
    browser.execute_script("Object.assign(EXPLORER, arguments[0]);", params)
    points = [(1.5, -0.5), (-2.0, 0.7), (0.0, 0.0), (3.0, 3.5)]
    for loss_type in EXPLORER_LOSSES:
        if f_div != "reverse_kl" and loss_type not in ("sigmoid", "robust", "hinge", "exo_pair"):
            continue
        for c, r in points:
            js = browser.execute_script(
                "return window.dpokitLoss(arguments[0], arguments[1], arguments[2], arguments[3]);",
                loss_type,
                c,
                r,
                0.3,
            )
            one = torch.ones(1)
            x = PairLogps(
                policy_chosen=torch.tensor([c], dtype=torch.float64),
                policy_rejected=torch.tensor([r], dtype=torch.float64),
                ref_chosen=torch.zeros(1, dtype=torch.float64),
                ref_rejected=torch.zeros(1, dtype=torch.float64),
                chosen_lengths=one,
                rejected_lengths=one,
            )
            want = compute_loss(loss_type, x, params).losses.item()
            assert js == pytest.approx(want, rel=1e-9, abs=1e-9), (loss_type, f_div, c, r)


@pytest.mark.slow
def test_trackers_receive_every_logged_record(tmp_path, tiny_model_dir):
    from accelerate.tracking import GeneralTracker

    class Recorder(GeneralTracker):
        name, requires_logging_directory = "recorder", False

        def __init__(self):
            super().__init__()
            self.logged, self.config, self.finished = [], None, False

        @property
        def tracker(self):
            return self

        def store_init_configuration(self, values):
            self.config = values

        def log(self, values, step=None, **kwargs):
            self.logged.append((step, dict(values)))

        def finish(self):
            self.finished = True

    rec = Recorder()
    cfg = load_cfg(tiny_model_dir, tmp_path / "run", "eval.every=2")
    train(cfg, trackers=[rec])
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [s for s, _ in rec.logged] == [r["step"] for r in records]
    assert rec.logged[-1][1]["loss"] == records[-1]["loss"]
    assert rec.config["loss.beta"] == 0.1 and rec.finished
