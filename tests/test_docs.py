"""Every command the README and docs/ show in a code block runs, as written, on the tiny model: `train`
commands get the tiny model and two steps appended (the real model is too slow for a test), everything
else runs unchanged, from a folder laid out like a checkout (configs/, ../shared/data) holding the files the
examples name. A `$ dpokit ...` command's shown output must appear in what it prints (`...` ends a line
abridged). A command that cannot run here must be listed in NOT_RUN with the reason."""

import re
import shutil
from pathlib import Path

import pytest
import torch

from dpokit.cli import main
from helpers import SHARED_DATA, TINY_ITERATE, copy_run

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NOT_RUN = {
    "make demo": "the demo pipeline runs in tests/test_demo.py on the tiny model; make demo itself takes minutes",
    "make test": "this is make test",
    "accelerate launch --config_file configs/accelerate/ddp.yaml -m dpokit.cli train configs/hh_lora.yaml": "the DDP config is for GPUs; data parallel on CPU (--num-processes) runs in tests/test_distributed.py",
    "python -m torch.distributed.run --nnodes 2 --node-rank 0 --nproc-per-node 1 --master-addr 10.0.0.1 --master-port 29500 -m dpokit.cli train configs/hh_lora.yaml": "needs a second machine; run as 2 nodes x 1 process on 127.0.0.1 in tests/test_distributed.py",
    "accelerate launch --config_file configs/accelerate/ddp.yaml --num_machines 2 --machine_rank 0 --main_process_ip 10.0.0.1 --main_process_port 29500 -m dpokit.cli train configs/hh_lora.yaml": "GPUs on two machines; the same launch through torch.distributed.run runs in tests/test_distributed.py",
}
NOT_RUN[
    "dpokit iterate configs/iterate.yaml iterate.judge=human iterate.samples_per_prompt=2 iterate.eval_prompts="
] = (
    "waits for people: tests/test_label_browser.py runs iterate.judge=human on the tiny model, votes cast "
    "through the page's API, stopped and resumed"
)
FAST_TRAIN = ("train.max_steps=2", "data.limit=24", "train.progress=false", "eval.batch_size=8")


def doc_commands() -> list[tuple[str, str, list[str]]]:
    """(doc name, command, shown output lines) of every command in a code block."""
    found = []
    for path in DOCS:
        for block in re.findall(r"^```[^\n]*\n(.*?)^```", path.read_text(), flags=re.S | re.M):
            lines = block.splitlines()
            console = any(
                line.startswith("$ ") for line in lines
            )  # commands after `$ `, the rest their output
            for line in lines:
                command = re.sub(r"\s+#(\s.*)?$", "", line.removeprefix("$ ")).strip()
                if line.startswith("$ ") or (
                    not console and re.match(r"(\.venv/bin/)?dpokit |make |accelerate |python ", command)
                ):
                    found.append((path.name, command, []))
                elif console and found:
                    found[-1][2].append(line)
    return found


COMMANDS = doc_commands()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_model_dir, tiny_lora_run):
    """A checkout-like folder: configs/, ../shared/data, the example files and run dirs the docs name."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from dpokit.data import load_examples
    from dpokit.files import write_jsonl

    root = tmp_path_factory.mktemp("docs")
    work = root / "work"
    work.mkdir()
    (work / "configs").symlink_to(ROOT / "configs")
    (root / "shared").symlink_to(SHARED_DATA.parent)
    (work / "bad.jsonl").write_text(
        '{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": "b"}\n'
    )
    examples, _ = load_examples("builtin:demo")
    write_jsonl(
        work / "heldout.jsonl",
        [{"prompt": e.prompt, "chosen": e.chosen, "rejected": e.rejected} for e in examples[-8:]],
    )
    write_jsonl(
        work / "prompts.jsonl", [{"prompt": f"The film was {w}"} for w in ("dull", "long", "a surprise")]
    )
    for name in ("policy", "sft"):
        shutil.copytree(tiny_model_dir, work / "path" / "to" / name)
    from dpokit.models import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model_dir))
    config = AutoConfig.from_pretrained(str(tiny_model_dir), num_labels=1)
    config.pad_token_id = tokenizer.pad_token_id
    with torch.random.fork_rng():
        AutoModelForSequenceClassification.from_config(config).save_pretrained(
            work / "path" / "to" / "reward-model"
        )
    tokenizer.save_pretrained(work / "path" / "to" / "reward-model")
    write_jsonl(
        work / "samples.jsonl",
        [
            {"prompt": f"Question {i}?", "completions": [f"yes {i}", f"no {i}", f"maybe {i}"]}
            for i in range(4)
        ],
    )
    for run in ("my-run", "20261127-071002"):  # the shared tiny LoRA run: step checkpoints and a final one
        copy_run(tiny_lora_run, work / "runs" / run)
    return work


def argv_of(command: str, tiny_model_dir, index: int) -> list[str]:
    argv = command.split()
    argv = argv[1:]  # `dpokit` or `.venv/bin/dpokit`
    if argv[0] in ("train", "train-rm") and "--help" not in argv and "--resume" not in argv:
        argv += [f"model.name={tiny_model_dir}", *FAST_TRAIN]
        if not named_run_dir(argv):  # a config that names its run dir keeps it: later commands read it
            argv.append(f"train.run_dir=runs/doc-{index}")
    if argv[0] == "iterate" and "--help" not in argv and "--resume" not in argv:
        argv += [f"model.name={tiny_model_dir}", *TINY_ITERATE]  # the command's own run dir: --resume uses it
    return argv


def serve_and_label(argv: list[str], tiny_model_dir) -> None:
    """A `dpokit label serve` command: run as a process (the embedded model swapped for the tiny one, any free
    port), the printed link opened, every comparison labeled through the page's API (the longer completion
    wins), then stopped with Ctrl-C: it exits 0 and prints the annotators."""
    import json
    import signal
    import subprocess
    import sys
    import urllib.request

    argv = [str(tiny_model_dir) if a == "smollm2-135m-instruct" else a for a in argv] + ["--port", "0"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "dpokit.cli", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        url = next(m.group(1) for line in proc.stdout if (m := re.search(r"open (http://\S+)", line)))
        token = url.partition("?token=")[2]

        def call(path, body=None):
            req = urllib.request.Request(
                url.split("?")[0] + path, None if body is None else json.dumps(body).encode()
            )
            req.add_header("X-Dpokit-Token", token)
            req.add_header("Content-Type", "application/json")
            with urllib.request.urlopen(req, timeout=30) as resp:
                return json.loads(resp.read())

        assert urllib.request.urlopen(url, timeout=30).status == 200
        assert call("api/stats")["comparisons"] > 0
        shown = call("api/next?annotator=docs")  # nothing left when an earlier command labeled the folder
        while shown["comparison"] is not None:
            c = shown["comparison"]
            choice = "left" if len(c["left"]) >= len(c["right"]) else "right"
            shown = call(
                "api/vote", {"annotator": "docs", "comparison": c["id"], "choice": choice, "comment": ""}
            )
        proc.send_signal(signal.SIGINT)
        out = proc.communicate(timeout=30)[0]
        assert proc.returncode == 0 and "docs:" in out and "Traceback" not in out, out
    finally:
        proc.kill()


def named_run_dir(argv: list[str]) -> bool:
    import yaml

    config = ROOT / argv[1] if argv[1].endswith(".yaml") else None
    named = config and (yaml.safe_load(config.read_text()).get("train") or {}).get("run_dir")
    return bool(named) or any(a.startswith("train.run_dir=") for a in argv)


def shown_lines_appear(shown: list[str], printed: str) -> None:
    flat = " ".join(printed.replace("│", " ").split())
    for line in shown:
        line = " ".join(line.replace("│", " ").split())
        if not line or line == "...":
            continue
        if line.endswith("..."):
            line = line[:-3].rstrip(" ,")
        assert line in flat, (line, printed)


@pytest.mark.slow
@pytest.mark.parametrize("doc, command, shown", COMMANDS, ids=[f"{d}: {c[:60]}" for d, c, _ in COMMANDS])
def test_documented_command_runs_as_written(
    doc, command, shown, workspace, tiny_model_dir, monkeypatch, capsys
):
    if command in NOT_RUN:
        pytest.skip(NOT_RUN[command])
    assert re.match(r"(\.venv/bin/)?dpokit ", command), (
        f"{doc}: {command!r} is neither run here nor listed in NOT_RUN"
    )
    monkeypatch.chdir(workspace)
    argv = argv_of(command, tiny_model_dir, COMMANDS.index((doc, command, shown)))
    if "--help" in argv:
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 0
        return
    if argv[:2] == ["label", "serve"]:
        serve_and_label(argv, tiny_model_dir)
        return
    expect_error = any("error:" in line for line in shown)
    assert main(argv) == (2 if expect_error else 0), capsys.readouterr().err
    out = capsys.readouterr()
    shown_lines_appear(shown, out.out + out.err)


def test_every_doc_command_is_collected():
    """The collector sees the examples (a broken fence would silently skip them all)."""
    names = [c for _, c, _ in COMMANDS]
    assert any(c.startswith(".venv/bin/dpokit train configs/tiny.yaml") for c in names)
    assert sum(c.startswith("dpokit eval") and d == "evaluation.md" for d, c, _ in COMMANDS) == 4
    assert any(c.startswith("dpokit train-rm configs/hh_rm.yaml") for c in names)  # docs/reward_models.md
    assert any(c.startswith("dpokit data check") for c in names)


# --- Python examples --------------------------------------------------------------------------------------

REAL_MODEL = 'MODEL = "smollm2-135m-instruct"'


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", path.read_text(), flags=re.S | re.M)


PYTHON_DOCS = [p for p in DOCS if python_blocks(p)]


@pytest.mark.slow
@pytest.mark.parametrize("path", PYTHON_DOCS, ids=[p.name for p in PYTHON_DOCS])
def test_python_examples_run_as_written(path, tmp_path, tiny_model_dir, monkeypatch, capsys):
    """Each doc's Python blocks run in order in one namespace, as a notebook runs its cells, in a folder laid
    out like a checkout; only the embedded model is swapped for the tiny one (`MODEL = ...`)."""
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in python_blocks(path):
        exec(compile(block.replace(REAL_MODEL, f'MODEL = "{tiny_model_dir}"'), str(path), "exec"), namespace)
    printed = capsys.readouterr().out
    assert "Traceback" not in printed
    if path.name == "python.md":  # the notebook's figures are real: the run trained and every stage ran
        run, rounds, result = namespace["run"], namespace["rounds"], namespace["result"]
        assert run.history[0]["loss"] == pytest.approx(0.6931, abs=1e-4) and len(run.history) == 8
        assert rounds.rounds[0].summary["data"]["samples"] == 24
        assert result.generation["prompts"] == 6 and namespace["exported"].folder.is_dir()
        assert "did you mean loss.beta" in printed
        assert namespace["short"].summary["stopped"] in printed


def test_every_python_doc_is_collected():
    assert [p.name for p in PYTHON_DOCS] and "python.md" in [p.name for p in PYTHON_DOCS]
