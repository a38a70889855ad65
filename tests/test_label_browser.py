"""The labeling page in a real browser (Debian's chromium through selenium) against `dpokit label serve` run
as a process: ten comparisons labeled by keyboard with a SIGKILL of the server midway (nothing lost, the
export equals the votes cast), two annotators at once with overlap 2 and their agreement on the page, and
completions holding <script> and <img onerror> shown as text. Then people as the rounds' judge:
`dpokit iterate` with iterate.judge=human waits for votes, is stopped while they come in, resumes, and ends
with the files of a run that was never stopped."""

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

from dpokit.labels.store import Store
from dpokit.rundir import Run
from helpers import TINY_ITERATE

pytestmark = pytest.mark.slow
HOSTILE = ["<script>window.__pwned = 1</script>", '<img src=x onerror="window.__pwned = 2">']


def start(argv: list[str], cwd: Path | None = None) -> tuple[subprocess.Popen, str]:
    """A dpokit process, and the page URL it prints (stdout for label serve, the log for iterate)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "dpokit.cli", *argv],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    seen = []
    for line in proc.stdout:
        seen.append(line)
        found = re.search(r"open (http://\S+)", line)
        if found:
            return proc, found.group(1)
    raise AssertionError("no URL printed:\n" + "".join(seen))


def serve(folder: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    return start(["label", "serve", str(folder), "--port", "0", *extra])


def wait_text(drv, element_id: str, pattern: str) -> str:
    WebDriverWait(drv, 20).until(lambda d: re.search(pattern, d.find_element(By.ID, element_id).text))
    return drv.find_element(By.ID, element_id).text


def shown(drv) -> tuple[str, str]:
    return drv.find_element(By.ID, "left").text, drv.find_element(By.ID, "right").text


def press(drv, key: str) -> None:
    drv.find_element(By.TAG_NAME, "body").send_keys(key)


def no_console_errors(drv) -> None:
    errors = [e for e in drv.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors


def test_ten_comparisons_by_keyboard_through_a_sigkill(tmp_path, browser):
    rows = [
        {"prompt": f"Question {i}?", "completions": [f"first answer {i}", f"second answer {i}"]}
        for i in range(12)
    ]
    data = tmp_path / "c.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    folder = tmp_path / "labels"
    proc, url = serve(folder, "--data", str(data))
    browser.get(url)
    browser.find_element(By.ID, "name").send_keys("alice", Keys.ENTER)
    wait_text(browser, "progress", r"^0 labeled")
    keys = ["a", "b", Keys.ARROW_LEFT, "t", "x", "s", "2", "1", "b", "a"]
    expected = {}  # (left, right) -> what the key said
    for n, key in enumerate(keys):
        if n == 5:  # SIGKILL the server with one comparison on screen, start it again, reload
            before = shown(browser)
            proc.kill()
            proc.wait()
            port = re.search(r":(\d+)/", url).group(1)  # the same origin: the page remembers its annotator
            proc, url = serve(folder, "--port", port)
            browser.refresh()
            wait_text(browser, "progress", rf"^{n} labeled")
            assert shown(browser) == before  # the same comparison, on the same sides
        if n == 3:  # a comment, typed after `c`, finished with Enter
            press(browser, "c")
            browser.switch_to.active_element.send_keys("same <b>quality</b>", Keys.ENTER)
        if n == 8:  # undo the previous vote, which is shown again, and vote again
            press(browser, "u")
            wait_text(browser, "progress", rf"^{n - 1} labeled")
            press(browser, keys[n - 1])
            wait_text(browser, "progress", rf"^{n} labeled")
        expected[shown(browser)] = {
            "a": "left",
            Keys.ARROW_LEFT: "left",
            "1": "left",
            "b": "right",
            "2": "right",
        }.get(key, {"t": "tie", "x": "both_bad", "s": "skip"}.get(key))
        press(browser, key)
        wait_text(browser, "progress", rf"^{n + 1} labeled")
    no_console_errors(browser)
    proc.kill()
    proc.wait()
    votes = Store(folder).votes()
    assert len(votes) == 10 and {v["annotator"] for v in votes} == {"alice"}
    comparisons = {c.id: c for c in Store(folder).comparisons()}
    got = {}
    for v in votes:
        c = comparisons[v["comparison"]]
        sides = (c.a, c.b) if v["left_side"] == "a" else (c.b, c.a)
        got[sides] = {"tie": "tie", "both_bad": "both_bad", "skip": "skip"}.get(v["choice"]) or (
            "left" if (v["choice"] == "a") == (v["left_side"] == "a") else "right"
        )
    assert got == expected
    assert [v["comment"] for v in votes if v["comment"]] == ["same <b>quality</b>"]
    out = tmp_path / "votes.jsonl"
    assert (
        subprocess.run(
            [
                sys.executable,
                "-m",
                "dpokit.cli",
                "label",
                "export",
                str(folder),
                str(out),
                "--format",
                "votes",
            ]
        ).returncode
        == 0
    )
    exported = [json.loads(line) for line in out.read_text().splitlines()]
    code = {"a": 1, "b": 2, "tie": 0, "both_bad": 0}
    want = [
        {
            "prompt": comparisons[v["comparison"]].prompt,
            "response1": comparisons[v["comparison"]].a,
            "response2": comparisons[v["comparison"]].b,
            "annotator1": code[v["choice"]],
            "annotator_names": ["alice"],
        }
        for v in sorted(votes, key=lambda v: v["comparison"])
        if v["choice"] != "skip"
    ]
    assert exported == want and len(exported) == 9


def test_two_annotators_with_overlap_two(tmp_path, browser):
    rows = [{"prompt": f"Pick {i}", "chosen": f"yes {i}", "rejected": f"no {i}"} for i in range(3)]
    data = tmp_path / "c.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc, url = serve(tmp_path / "labels", "--data", str(data), "--overlap", "2")
    try:
        windows = {}
        for who in ("alice", "bob"):  # two tabs open at once, each as its annotator
            if windows:
                browser.switch_to.new_window("tab")
            browser.get(f"{url}?annotator={who}")
            wait_text(browser, "progress", r"^0 labeled · 3 left")
            windows[who] = browser.current_window_handle
        for n in range(3):
            for who in ("alice", "bob"):
                browser.switch_to.window(windows[who])
                left, _ = shown(browser)
                # alice always prefers "yes"; bob agrees on the first two and picks "no" on the last
                wants_yes = who == "alice" or n < 2
                press(browser, "a" if left.startswith("yes") == wants_yes else "b")
                wait_text(browser, "progress", rf"^{n + 1} labeled")
        assert browser.find_element(By.ID, "done").is_displayed()
        wait_text(browser, "overall", r"^3 of 3 comparisons complete")
        table = browser.find_element(By.ID, "pairs").text
        assert "alice · bob 3 0.667" in table, table
        row = browser.find_element(By.CSS_SELECTOR, '#annotators tr[data-annotator="bob"]').text
        assert row == "bob 3 0 0.667 3", row
        browser.switch_to.new_window("tab")  # a third annotator finds nothing left: overlap 2 is reached
        browser.get(f"{url}?annotator=carol")
        wait_text(browser, "progress", r"^0 labeled · 0 left")
        assert browser.find_element(By.ID, "done").is_displayed()
        no_console_errors(browser)
    finally:
        proc.kill()
        for handle in browser.window_handles[1:]:
            browser.switch_to.window(handle)
            browser.close()
        browser.switch_to.window(browser.window_handles[0])


def test_untrusted_text_shows_as_text(tmp_path, browser):
    rows = [
        {
            "prompt": [{"role": "system", "content": HOSTILE[1]}, {"role": "user", "content": HOSTILE[0]}],
            "completions": HOSTILE,
        }
    ]
    data = tmp_path / "c.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc, url = serve(tmp_path / "labels", "--data", str(data))
    try:
        browser.get(f"{url}?annotator=" + urllib.request.quote("<img src=x onerror=alert(1)>"))
        wait_text(browser, "progress", r"^0 labeled")
        time.sleep(0.5)  # an injected image would have fired onerror by now
        assert browser.execute_script("return window.__pwned === undefined")
        assert set(shown(browser)) == set(HOSTILE)
        prompt = browser.find_element(By.ID, "prompt").text
        assert HOSTILE[0] in prompt and HOSTILE[1] in prompt
        assert browser.execute_script("return document.querySelectorAll('main img, main script').length") == 0
        press(browser, "a")
        wait_text(browser, "overall", r"1 votes")
        assert "<img src=x onerror=alert(1)>" in browser.find_element(By.ID, "annotators").text
        assert browser.execute_script("return window.__pwned === undefined")
        no_console_errors(browser)
    finally:
        proc.kill()


def vote_longer(url: str, who: str = "tester", limit: int | None = None) -> int:
    """Label through the API as a person who prefers the longer completion (tie when equal); returns votes."""

    def call(path, body=None):
        req = urllib.request.Request(
            url.rstrip("/") + path, data=None if body is None else json.dumps(body).encode()
        )
        req.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read())

    shown, cast = call(f"/api/next?annotator={who}"), 0
    while shown["comparison"] is not None and (limit is None or cast < limit):
        c = shown["comparison"]
        choice = (
            "tie"
            if len(c["left"]) == len(c["right"])
            else "left"
            if len(c["left"]) > len(c["right"])
            else "right"
        )
        shown = call("/api/vote", {"annotator": who, "comparison": c["id"], "choice": choice, "comment": ""})
        cast += 1
    return cast


def iterate_argv(tiny_model_dir, run_dir) -> list[str]:
    return [
        "iterate",
        f"model.name={tiny_model_dir}",
        *TINY_ITERATE,
        "iterate.rounds=1",
        "iterate.prompts_per_round=3",
        "iterate.samples_per_prompt=3",
        "iterate.judge=human",
        "iterate.reward=",
        "iterate.eval_prompts=",
        "iterate.label_port=0",
        f"train.run_dir={run_dir}",
    ]


def test_people_judge_a_round_stopped_and_resumed(tmp_path, tiny_model_dir):
    whole = tmp_path / "whole"
    proc, url = start(iterate_argv(tiny_model_dir, whole))
    assert vote_longer(url) == 9  # 3 prompts x 3 samples: 3 comparisons each
    assert proc.wait(timeout=300) == 0, proc.stdout.read()

    stopped = tmp_path / "stopped"
    proc, url = start(iterate_argv(tiny_model_dir, stopped))
    assert vote_longer(url, limit=4) == 4
    proc.send_signal(signal.SIGINT)
    out = proc.stdout.read()
    assert proc.wait(timeout=60) == 130, out
    assert "5 of 9 comparisons wait for labels" in out and "dpokit iterate --resume" in out
    assert not (stopped / "rounds" / "1" / "scores.jsonl").exists()
    proc, url = start(
        ["label", "serve", str(stopped), "--port", "0"]
    )  # labels come in while the run is stopped
    assert vote_longer(url, limit=2) == 2
    proc.kill()
    proc.wait()
    proc, url = start(["iterate", "--resume", str(stopped)])
    assert vote_longer(url) == 3
    assert proc.wait(timeout=300) == 0, proc.stdout.read()

    for name in ("samples.jsonl", "scores.jsonl", "pairs.jsonl", "pair_stats.json"):
        assert (whole / "rounds/1" / name).read_text() == (stopped / "rounds/1" / name).read_text(), name
    scores = [json.loads(line) for line in (whole / "rounds/1/scores.jsonl").read_text().splitlines()]
    samples = [json.loads(line) for line in (whole / "rounds/1/samples.jsonl").read_text().splitlines()]
    for s, row in zip(samples, scores, strict=True):  # the longest text wins its comparisons
        lengths = [len(c) for c in s["completions"]]
        assert row["raw"].index(max(row["raw"])) == lengths.index(max(lengths))
    a, b = (
        load_file(Run(r / "rounds/1/train").final_checkpoint / "adapter_model.safetensors")
        for r in (whole, stopped)
    )
    assert all(torch.equal(a[k], b[k]) for k in a)
