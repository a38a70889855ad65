"""Training guards: each one triggered by a run built to hit it, with the message it prints."""

import json
import math

import pytest
import torch

from dpokit.errors import TrainingError
from dpokit.guards import Guards
from dpokit.loop import train
from helpers import load_cfg


def cfg(tmp_path, model_dir, *overrides):
    return load_cfg(
        model_dir,
        tmp_path / "run",
        "data.limit=40",
        "data.eval_fraction=0.2",
        "train.max_steps=4",
        "train.save_final=true",
        *overrides,
    )


def test_nan_from_an_absurd_lr_stops_cleanly_with_the_last_good_checkpoint(tmp_path, tiny_model_dir):
    """The checkpoint kept after a non-finite step holds exactly the weights of the step before it (the
    update that broke them was not applied): equal to that step's own checkpoint, and finite."""
    from safetensors.torch import load_file

    from dpokit.rundir import Run

    with pytest.raises(TrainingError) as info:
        train(
            cfg(
                tmp_path,
                tiny_model_dir,
                "train.lr=1e30",
                "train.max_grad_norm=0",
                "train.max_steps=6",
                "train.checkpoint_every=1",
                "lora.enabled=false",
            )
        )
    message = str(info.value)
    assert (
        "is not finite" in message and "train.lr=1e+30 too high" in message and "last good weights" in message
    )
    run = Run(tmp_path / "run")
    assert run.summary["stopped"] == message
    last_good = run.final_checkpoint
    good_step = int(last_good.name.removeprefix("step-").removesuffix("-last-good"))
    assert last_good.name == f"step-{good_step}-last-good" and f"(after step {good_step})" in message
    assert good_step >= 1, "the absurd lr should leave one finite step before the non-finite one"
    kept = load_file(str(last_good / "model.safetensors"))
    want = load_file(str(run.step_checkpoint(good_step) / "model.safetensors"))
    start = load_file(str(tiny_model_dir / "model.safetensors"))
    assert kept.keys() == want.keys() and all(torch.equal(kept[k], want[k]) for k in want)
    assert all(torch.isfinite(v).all() for v in kept.values())
    assert any(not torch.equal(kept[k], start[k]) for k in start)  # the good step did move the weights


@pytest.mark.slow
def test_vanished_gradient_warning(tmp_path, tiny_model_dir):
    # with LoRA, lr 1e30 saturates the network instead (RMSNorm maps huge activations to 0): loss stays
    # finite but the gradient is exactly 0 from step 2 on
    result = train(
        cfg(tmp_path, tiny_model_dir, "train.lr=1e30", "train.max_grad_norm=0", "data.eval_fraction=0")
    )
    warnings = json.loads((result.run_dir / "summary.json").read_text())["warnings"]
    print(warnings)
    assert any("gradient norm is 0" in w and "train.lr" in w for w in warnings)


def test_drift_warning(tmp_path, tiny_model_dir, caplog):
    result = train(
        cfg(tmp_path, tiny_model_dir, "train.lr=5e-2", "train.drift_warn=0.05", "data.eval_fraction=0")
    )
    warnings = json.loads((result.run_dir / "summary.json").read_text())["warnings"]
    print(warnings)
    assert any("reference drift" in w and "Lower train.lr" in w and "raise loss.beta" in w for w in warnings)
    assert all(
        "drift/abs_logratio_per_token" in r and "drift/kl_chosen_per_token" in r for r in result.history
    )


@pytest.mark.slow
def test_flat_margins_warning(tmp_path, tiny_model_dir):
    # lr so small that nothing moves: margins stay ~0
    result = train(
        cfg(
            tmp_path,
            tiny_model_dir,
            "train.lr=1e-12",
            "train.flat_window=2",
            "train.max_steps=4",
            "data.eval_fraction=0",
        )
    )
    warnings = json.loads((result.run_dir / "summary.json").read_text())["warnings"]
    print(warnings)
    assert any("rewards/margins is flat" in w and "no preference is being learned" in w for w in warnings)


@pytest.mark.slow
def test_learning_run_gives_no_flat_warning(tmp_path, tiny_model_dir):
    result = train(
        cfg(tmp_path, tiny_model_dir, "train.flat_window=2", "train.max_steps=4", "data.eval_fraction=0")
    )
    assert not any("flat" in w for w in json.loads((result.run_dir / "summary.json").read_text())["warnings"])


@pytest.mark.slow
def test_early_stopping_keeps_the_best_checkpoint(tmp_path, tiny_model_dir):
    # lr 1e-12: eval margins never improve after the first evaluation -> stop after `patience` more
    result = train(
        cfg(
            tmp_path,
            tiny_model_dir,
            "train.lr=1e-12",
            "train.max_steps=20",
            "eval.every=1",
            "eval.patience=2",
            "eval.min_delta=0.01",
        )
    )
    print(result.stopped)
    assert result.stopped.startswith("early stopping at step 3") and len(result.history) == 3
    assert (result.run_dir / "checkpoints" / "best" / "adapter_config.json").exists()
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert summary["stopped"] == result.stopped and summary["best_eval_step"] == 1


def test_guard_unit_logic():
    g = Guards(drift_warn=1.0, flat_window=2, flat_min_delta=0.0, patience=2, min_delta=0.1)
    for step, m in enumerate([0.0, 0.1, 0.2, 0.3], start=1):  # growing: windows (0, .1) -> (.2, .3)
        g.on_step({"step": step, "rewards/margins": m}, beta=0.1, lr=1e-5)
    assert g.warnings == []
    for step, m in enumerate(
        [0.3, 0.3], start=5
    ):  # window (.2, .3) -> (.3, .3): mean 0.25 -> 0.3, still growing
        g.on_step({"step": step, "rewards/margins": m}, beta=0.1, lr=1e-5)
    assert g.warnings == []
    for step, m in enumerate([0.3, 0.3], start=7):  # (.3, .3) -> (.3, .3): flat
        g.on_step({"step": step, "rewards/margins": m}, beta=0.1, lr=1e-5)
    assert len(g.warnings) == 1 and "flat" in g.warnings[0]
    assert g.on_eval({"step": 1, "eval/rewards/margins": 1.0})
    assert not g.on_eval({"step": 2, "eval/rewards/margins": 1.05})  # +0.05 < min_delta
    assert g.stop_reason is None
    assert not g.on_eval({"step": 3, "eval/rewards/margins": 0.5})
    assert g.stop_reason and "best +1.0000 at step 1" in g.stop_reason
    assert math.isfinite(g.best)


@pytest.mark.slow
def test_bf16_full_finetuning_of_grid_weights_warns(tmp_path, tiny_model_dir):
    """Weights that are exactly bf16 values (a bf16-published or dequantized checkpoint) get the bf16 warning
    with the fix; random fp32 weights, fp32 training and LoRA do not."""
    from dpokit.models import load_model

    grid = tmp_path / "grid-model"
    model = load_model(str(tiny_model_dir))
    model.to(torch.bfloat16).to(torch.float32).save_pretrained(grid)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tiny_model_dir / name).exists():
            (grid / name).write_bytes((tiny_model_dir / name).read_bytes())

    def warnings_of(model_dir, *extra):
        result = train(
            cfg(tmp_path / str(len(list(tmp_path.iterdir()))), model_dir, "train.max_steps=1", *extra)
        )
        return json.loads((result.run_dir / "summary.json").read_text())["warnings"]

    full_bf16 = ("lora.enabled=false", "train.bf16=true", "train.lr=1e-5")
    said = warnings_of(grid, *full_bf16)
    assert any(
        "100.0% of the weights are exactly bf16 values" in w and "train.bf16=false" in w for w in said
    ), said
    assert not warnings_of(tiny_model_dir, *full_bf16)
    assert not any("bf16" in w for w in warnings_of(grid, "lora.enabled=false"))
    assert not any("bf16" in w for w in warnings_of(grid, "train.bf16=true"))


def test_bf16_grid_shares_literal():
    from dpokit.models import bf16_grid_shares

    # 1.0 is a bf16 value; 1 + 2^-8 lies halfway between 1 and the next bf16 value 1 + 2^-7; 1.1 is neither
    t = torch.tensor([1.0, 1.0 + 2**-8, 1.1, -1.0 - 2**-8])
    assert bf16_grid_shares([t, torch.zeros(2, dtype=torch.int64)]) == (0.25, 0.5)
