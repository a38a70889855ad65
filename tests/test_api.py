"""The Python API (`import dpokit`): data in memory trains exactly as the same records in a file, configs from
a path, a dict or a Config with overrides in either form, errors of dpokit's own types with the CLI's
messages, callbacks that see every step and can stop a run, loading and generating, evaluation and rounds
with Python functions, data checks and filters as objects."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import dpokit
from dpokit.data import load_examples
from helpers import TINY_RUN, copy_run

SRC = Path(dpokit.__file__).parent
TIMING = ("tokens_per_s", "step_time_s")


def demo_records(n: int = 24) -> list[dict]:
    examples, _ = load_examples("builtin:demo")
    return [{"prompt": e.prompt, "chosen": e.chosen, "rejected": e.rejected} for e in examples[:n]]


def tiny(model_dir, run_dir, **extra) -> dict:
    """TINY_RUN as Python settings (dotted keys), without its data file: the tests give data."""
    settings = {
        k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in TINY_RUN) if k != "data.train"
    }
    return {"model.name": str(model_dir), "train.run_dir": str(run_dir), **settings, **extra}


def without_timing(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


@pytest.mark.slow
def test_a_dataset_in_memory_trains_bit_identically_to_the_same_records_in_a_file(tmp_path, tiny_model_dir):
    import datasets
    from safetensors.torch import load_file

    records = demo_records()
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    from_file = dpokit.train(
        data=str(path), **tiny(tiny_model_dir, tmp_path / "file", **{"train.save_final": True})
    )
    from_memory = dpokit.train(
        data=datasets.Dataset.from_list(records),
        **tiny(tiny_model_dir, tmp_path / "memory", **{"train.save_final": True}),
    )
    assert without_timing(from_memory.metrics) == without_timing(from_file.metrics)
    assert len(from_memory.history) == 3 and "eval/loss" in from_memory.metrics[0]
    a = load_file(str(from_file.final_checkpoint / "adapter_model.safetensors"))
    b = load_file(str(from_memory.final_checkpoint / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    # the records are saved with the run, where its config points: the run is whole on disk
    saved = from_memory.config.data.train
    assert Path(saved) == from_memory.path / "data" / "train.jsonl"
    assert [json.loads(line) for line in Path(saved).read_text().splitlines()] == records


@pytest.mark.slow
def test_a_dataset_dict_gives_its_test_split_as_held_out_pairs(tmp_path, tiny_model_dir):
    import datasets

    records = demo_records()
    splits = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(records[:16]), "test": datasets.Dataset.from_list(records[16:])}
    )
    run = dpokit.train(data=splits, **tiny(tiny_model_dir, tmp_path / "run", **{"data.eval_fraction": 0.0}))
    stats = run.data_stats
    assert stats["train_file"]["valid"] == 16 and stats["eval_file"]["valid"] == 8
    assert run.config.data.eval.endswith("data/eval.jsonl")


def test_every_form_of_config_gives_the_same_config(tmp_path, tiny_model_dir):
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text(
        f"model:\n  name: {tiny_model_dir}\nloss:\n  beta: 0.3\ndata:\n  train: builtin:demo\n"
    )
    want = dpokit.config(yaml_file, **{"train.lr": 1e-4, "lora.r": 2})
    assert want.loss.beta == 0.3 and want.train.lr == 1e-4 and want.lora.r == 2
    as_dict = {"model": {"name": str(tiny_model_dir)}, "loss.beta": 0.3, "data": {"train": "builtin:demo"}}
    assert dpokit.config(as_dict, train={"lr": 1e-4}, lora={"r": 2}) == want
    assert dpokit.config(want) == want
    assert dpokit.config(model=str(tiny_model_dir), data={"train": "builtin:demo"}).model.name == str(
        tiny_model_dir
    )


def test_user_mistakes_raise_dpokit_errors_with_the_cli_message_and_write_nothing(tmp_path, tiny_model_dir):
    import numpy as np

    run = tmp_path / "run"
    with pytest.raises(dpokit.ConfigError) as info:
        dpokit.train(data=demo_records(), **tiny(tiny_model_dir, run, **{"loss.betta": 0.1, "train.lr": 0}))
    assert "loss.betta: unknown key (did you mean loss.beta?)" in str(info.value)
    assert "train.lr=0.0: must be > 0" in str(info.value)  # every problem at once
    bad = demo_records(6)
    del bad[3]["rejected"]
    with pytest.raises(dpokit.DataError, match=r"data:row 3: rejected: missing field"):
        dpokit.train(data=bad, **tiny(tiny_model_dir, run))
    numpy_score = [{**demo_records(1)[0], "score_chosen": np.float32(0.5)}]
    with pytest.raises(dpokit.DataError, match=r"data:row 0: score_chosen: not a JSON value"):
        dpokit.train(data=numpy_score, **tiny(tiny_model_dir, run))
    with pytest.raises(dpokit.ModelLoadError, match="no such folder or file"):
        dpokit.train(data=demo_records(), **tiny(tmp_path / "no-model", run))
    with pytest.raises(dpokit.UsageError, match="a config cannot be given too"):
        dpokit.train({"loss": {"beta": 0.2}}, resume=tmp_path)
    with pytest.raises(dpokit.UsageError, match="data / eval_data cannot be given too"):
        dpokit.train(resume=tmp_path, data=demo_records())
    assert not run.exists()
    for err in (dpokit.ConfigError, dpokit.DataError, dpokit.ModelLoadError, dpokit.UsageError):
        assert issubclass(err, dpokit.DpokitError)


@pytest.mark.slow
def test_callbacks_see_every_step_and_one_can_stop_the_run(tmp_path, tiny_model_dir):
    seen = []

    def watch(record):
        seen.append(record["step"])

    def stop_after_two(record):
        return record["step"] == 2

    run = dpokit.train(
        data=demo_records(),
        callbacks=[watch, stop_after_two],
        **tiny(tiny_model_dir, tmp_path / "run", **{"train.max_steps": 5, "train.save_final": True}),
    )
    assert seen == [1, 2]
    assert (
        run.summary["steps"] == 2
        and "stopped by callback stop_after_two after step 2" in run.summary["stopped"]
    )
    assert run.final_checkpoint.name == "step-2" and [r["step"] for r in run.history] == [1, 2]


@pytest.mark.slow
def test_a_run_loads_generates_and_names_its_checkpoints(tiny_lora_run):
    run = dpokit.Run(tiny_lora_run.run_dir)
    assert run.final_checkpoint.name == "step-3" and run.latest_checkpoint.name == "step-3"
    assert [c.name for c in run.checkpoints] == ["step-1", "step-2", "step-3"]
    policy = dpokit.load(run, reference=True)
    assert policy.is_lora and policy.reference.disable_adapters  # LoRA: its reference is adapters off
    again = run.load()
    one = policy.generate("The film was", max_new_tokens=8, seed=3)
    assert isinstance(one, str) and one == again.generate("The film was", max_new_tokens=8, seed=3)
    many = policy.generate(["a", [{"role": "user", "content": "hi"}]], n=2, max_new_tokens=4)
    assert len(many) == 2 and all(len(row) == 2 and all(isinstance(t, str) for t in row) for row in many)
    first = dpokit.load(run, checkpoint=1)
    assert first.checkpoint.name == "step-1"
    with pytest.raises(dpokit.UsageError, match="no checkpoint 9"):
        dpokit.load(run, checkpoint=9)


@pytest.mark.slow
def test_evaluate_with_a_python_reward_writes_into_the_run(tiny_lora_run, tmp_path):
    run = dpokit.Run(copy_run(tiny_lora_run, tmp_path / "run"))
    result = dpokit.evaluate(
        run,
        data=demo_records(8),
        prompts=["The film was", "I liked"],
        reward=lambda prompts, completions: [float(len(c)) for c in completions],
        samples=2,
        max_new_tokens=6,
    )
    assert result.preference["pairs"] == 8 and 0 <= result.preference["rewards/accuracies"] <= 1
    gen = result.generation
    assert gen["prompts"] == 2 and gen["samples_per_prompt"] == 2
    lengths = [len(c) for r in result.samples for c in r["policy"]]
    assert gen["reward/policy"] == pytest.approx(sum(lengths) / len(lengths))  # the lambda scored them
    assert result.path == run.path / "eval.json" and run.eval_results["reward"].startswith("python:")
    page = run.report()
    assert page == run.path / "report.html" and "Training curves" in page.read_text()
    with pytest.raises(dpokit.UsageError, match="unknown setting 'sample'.*did you mean samples"):
        dpokit.evaluate(run, data=demo_records(8), sample=2)


@pytest.mark.slow
def test_iterate_with_python_prompts_and_reward_then_continue(tmp_path, tiny_model_dir):
    prompts = ["The film was", "This movie", "I watched", "The plot", "The actors", "The ending"]

    def reward(ps, cs):
        return [float(len(c)) for c in cs]

    settings = {
        "model": str(tiny_model_dir),
        "iterate.rounds": 1,
        "iterate.samples_per_prompt": 4,
        "iterate.max_new_tokens": 8,
        "iterate.eval_num_prompts": 2,
        "train.run_dir": str(tmp_path / "it"),
        "train.progress": False,
        "train.batch_size": 4,
        "lora.r": 4,
        "train.lr": 1e-3,
    }
    run = dpokit.iterate(prompts=prompts, eval_prompts=prompts[:2], reward=reward, **settings)
    (round1,) = run.rounds
    summary = round1.summary
    assert summary["data"]["prompts"] == 6 and summary["data"]["samples"] == 24
    scores = round1.read("scores")
    samples = round1.read("samples")
    assert [s["raw"] for s in scores] == [[float(len(c)) for c in s["completions"]] for s in samples]
    assert round1.train.summary["steps"] >= 1 and isinstance(run.load().generate("Hi", max_new_tokens=3), str)
    with pytest.raises(
        dpokit.RewardError, match=r"reward 'python:test_iterate.*reward' was a Python function"
    ):
        dpokit.iterate(resume=run)
    before = round1.summary
    again = dpokit.iterate(resume=run, reward=reward, prompts=prompts, eval_prompts=prompts[:2])
    assert again.rounds[0].summary == before  # done rounds are not redone
    calls = []

    def longer(prompt, a, b):
        calls.append(prompt)
        return 1.0 if len(a) > len(b) else 0.0 if len(a) < len(b) else 0.5

    judged = dpokit.iterate(
        prompts=prompts, judge=longer, **{**settings, "train.run_dir": str(tmp_path / "judged")}
    )
    assert (
        len(calls) == 6 * 4 * 3
        and judged.config.iterate.judge
        == "python:test_iterate_with_python_prompts_and_reward_then_continue.<locals>.longer"
    )
    (judged_round,) = judged.rounds
    for s, sc in zip(judged_round.read("samples"), judged_round.read("scores"), strict=True):
        lengths = [len(c) for c in s["completions"]]
        # a sample's score is its mean win probability: the longest one scores highest
        assert max(range(4), key=lambda i: (sc["raw"][i], -i)) == max(
            range(4), key=lambda i: (lengths[i], -i)
        )


def test_check_and_filter_return_objects(tmp_path):
    records = demo_records(12)
    records += [records[0], {**records[1], "rejected": records[1]["chosen"]}]
    report = dpokit.check(records)
    assert report.valid == 14 and report.trainable and report["duplicate_pairs"] == 1
    assert any("chosen == rejected" in tip for tip in report.advice)
    assert "records / valid" in report.text()
    result = dpokit.filter(records, tmp_path / "clean.jsonl")
    assert result.kept == 12 and result.dropped == {"duplicate pair": 1, "identical chosen and rejected": 1}
    assert len((tmp_path / "clean.jsonl").read_text().splitlines()) == 12 and len(result.rows) == 12
    with pytest.raises(dpokit.UsageError, match="did you mean min_score_gap"):
        dpokit.filter(records, min_score_gapp=1.0)


@pytest.mark.slow
def test_export_from_python(tiny_lora_run, tmp_path):
    from transformers import AutoModelForCausalLM

    done = dpokit.export(tiny_lora_run.run_dir, tmp_path / "merged")
    model = AutoModelForCausalLM.from_pretrained(done.folder)
    assert model.config.vocab_size > 0 and (done.folder / "tokenizer_config.json").is_file()


# --- the architecture's rules -----------------------------------------------------------------------------


def modules_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(out.stdout.split())


@pytest.mark.slow
def test_the_data_tools_the_report_and_the_api_surface_import_no_torch():
    loaded = modules_after(
        "import dpokit, dpokit.report, dpokit.data, dpokit.data.check, dpokit.data.filters"
    )
    assert "torch" not in loaded


@pytest.mark.slow
@pytest.mark.parametrize(
    "module, forbidden",
    [
        ("dpokit.exporter", {"dpokit.loop", "dpokit.session", "dpokit.objective", "dpokit.data.prepare"}),
        ("dpokit.evaluation", {"dpokit.loop", "dpokit.session", "dpokit.schedule", "dpokit.data.prepare"}),
        ("dpokit.rounds", {"dpokit.loop", "dpokit.session"}),  # it trains through loop.train, when it trains
        ("dpokit.cli", {"torch", "dpokit.loop", "dpokit.session"}),
    ],
)
def test_what_each_stage_does_not_import(module, forbidden):
    assert not forbidden & modules_after(f"import {module}")


def test_the_run_dir_module_alone_names_the_run_files():
    names = ("summary.json", "metrics.jsonl", "checkpoints/")
    found = [
        f"{path.relative_to(SRC)}:{n}"
        for path in SRC.rglob("*.py")
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if any(name in line for name in names)
    ]
    assert found and all(f.startswith("rundir.py:") for f in found), found


def test_no_library_code_ends_the_process():
    calls = [
        f"{path.relative_to(SRC)}:{n}"
        for path in SRC.rglob("*.py")
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if "sys.exit(" in line or "os._exit(" in line
    ]
    assert calls and all(c.startswith("launch.py:") for c in calls), calls


@pytest.mark.slow
def test_the_step_one_loss_is_ln2_through_the_api(tiny_lora_run):
    first = dpokit.Run(tiny_lora_run.run_dir).history[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6) and first["rewards/margins"] == 0
