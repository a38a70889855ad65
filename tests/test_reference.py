"""The reference: one pass per micro-batch when live, none at all for reference-free losses, and a cache of
precomputed log-probs that covers exactly the micro-batches a run visits and gives the same numbers as the
live reference, with a cold cache or a warm one, for a run extended past an earlier one, and per setting."""

import json

import pytest
import torch

from dpokit.cli import main
from dpokit.logps import CompletionLogps
from dpokit.loop import train
from dpokit.reference import Reference
from helpers import cli_args, load_cfg

TIMING = {"tokens_per_s", "step_time_s"}


def strip(records):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


@pytest.mark.slow
def test_dpo_runs_one_reference_pass_per_micro_batch(tmp_path, tiny_model_dir, monkeypatch):
    calls = []
    real = Reference.sequence_logps
    monkeypatch.setattr(
        Reference, "sequence_logps", lambda self, *a, **k: calls.append(1) or real(self, *a, **k)
    )
    train(
        load_cfg(
            tiny_model_dir, tmp_path / "r", "data.eval_fraction=0", "train.grad_accum=2", "train.max_steps=2"
        )
    )
    assert len(calls) == 4


@pytest.mark.slow
@pytest.mark.parametrize("name", ["simpo", "orpo", "cpo", "sft"])
@pytest.mark.parametrize("lora", ["true", "false"])
def test_reference_free_losses_build_and_run_no_reference(tmp_path, tiny_model_dir, monkeypatch, name, lora):
    created, policy_calls = [], []
    real_init, real_forward = Reference.__init__, CompletionLogps.forward
    monkeypatch.setattr(
        Reference, "__init__", lambda self, *a, **k: created.append(1) or real_init(self, *a, **k)
    )

    def counting_forward(self, *args, **kwargs):
        policy_calls.append(1)
        return real_forward(self, *args, **kwargs)

    monkeypatch.setattr(CompletionLogps, "forward", counting_forward)
    assert (
        main(
            cli_args(
                tiny_model_dir,
                tmp_path / "r",
                f"loss.type={name}",
                f"lora.enabled={lora}",
                "data.eval_fraction=0",
                "train.max_steps=2",
            )
        )
        == 0
    )
    # no Reference (so no frozen copy of the weights) and no reference forward pass: the policy ran exactly
    # once per micro-batch (2 steps x 1 micro-batch)
    assert created == [] and len(policy_calls) == 2


@pytest.mark.slow
def test_precomputed_reference_covers_only_the_scheduled_pairs(tmp_path, tiny_model_dir, monkeypatch):
    """2 steps x 4 pairs of 200: the reference pass runs on those 8 pairs, not on all 200."""
    seen = []
    forward = CompletionLogps.forward

    def counting(self, input_ids, *args, **kwargs):
        if not torch.is_grad_enabled():
            seen.append(input_ids.shape[0])
        return forward(self, input_ids, *args, **kwargs)

    monkeypatch.setattr(CompletionLogps, "forward", counting)
    train(
        load_cfg(
            tiny_model_dir,
            tmp_path / "r",
            "data.limit=200",
            "train.prefix_sharing=false",
            "train.packing=false",
            "data.eval_fraction=0",
            "train.max_steps=2",
            "train.precompute_ref=true",
            f"train.ref_cache_dir={tmp_path / 'cache'}",
        )
    )
    assert seen == [8, 8]  # two micro-batches, padded: 4 chosen + 4 rejected rows each


@pytest.mark.slow
@pytest.mark.parametrize("lora", ["true", "false"])
def test_cached_reference_equals_the_live_one_and_builds_no_copy(tmp_path, tiny_model_dir, monkeypatch, lora):
    lr = "train.lr=1e-3" if lora == "true" else "train.lr=1e-4"
    live = train(
        load_cfg(tiny_model_dir, tmp_path / "live", f"lora.enabled={lora}", lr, "eval.every=1")
    ).history

    def no_copy(*args, **kwargs):
        raise AssertionError("a cached reference must not build a frozen copy")

    monkeypatch.setattr(Reference, "frozen_copy", no_copy)
    cached = train(
        load_cfg(
            tiny_model_dir,
            tmp_path / "cached",
            f"lora.enabled={lora}",
            lr,
            "eval.every=1",
            "train.precompute_ref=true",
            f"train.ref_cache_dir={tmp_path / 'cache'}",
        )
    ).history
    assert strip(cached) == strip(live)  # the same batches through the same kernels: equal, not close


@pytest.mark.slow
def test_a_longer_run_extends_the_cache_to_the_same_numbers(tmp_path, tiny_model_dir):
    """A 2-step run fills part of the cache; a 5-step run with that warm cache equals one with a cold cache,
    and both equal the live reference, in the packed, prefix-shared layout."""
    fast = (
        "train.prefix_sharing=true",
        "train.packing=true",
        "data.limit=60",
        "train.max_steps=5",
        "eval.every=2",
    )
    warm_cache, cold_cache = tmp_path / "warm-cache", tmp_path / "cold-cache"
    train(
        load_cfg(
            tiny_model_dir,
            tmp_path / "short",
            *fast,
            "train.max_steps=2",
            "train.precompute_ref=true",
            f"train.ref_cache_dir={warm_cache}",
        )
    )
    warm = train(
        load_cfg(
            tiny_model_dir,
            tmp_path / "warm",
            *fast,
            "train.precompute_ref=true",
            f"train.ref_cache_dir={warm_cache}",
        )
    )
    cold = train(
        load_cfg(
            tiny_model_dir,
            tmp_path / "cold",
            *fast,
            "train.precompute_ref=true",
            f"train.ref_cache_dir={cold_cache}",
        )
    )
    live = train(load_cfg(tiny_model_dir, tmp_path / "live", *fast))
    assert strip(warm.history) == strip(cold.history) == strip(live.history)
    reference = json.loads((tmp_path / "warm" / "summary.json").read_text())["reference"]
    assert reference["train"] == {"batches": 5, "pairs": 20, "computed": 3, "reused": 2}
    assert reference["eval"]["reused"] == reference["eval"]["batches"]


@pytest.mark.slow
def test_precompute_command_fills_what_training_reuses_and_settings_key_the_cache(
    tmp_path, tiny_model_dir, capsys
):
    common = [
        f"model.name={tiny_model_dir}",
        "data.train=builtin:demo",
        "data.limit=24",
        "data.eval_fraction=0.25",
        f"train.ref_cache_dir={tmp_path / 'cache'}",
        "train.device=cpu",
        "train.max_steps=3",
        "train.progress=false",
    ]
    assert main(["precompute-ref", *common]) == 0
    assert "train: 12 pairs in 3 batches (3 computed, 0 reused)" in capsys.readouterr().out
    run = train(load_cfg(tiny_model_dir, tmp_path / "r1", *common, "train.precompute_ref=true"))
    stats = json.loads((run.run_dir / "summary.json").read_text())["reference"]
    assert stats["train"]["computed"] == 0 and stats["eval"]["computed"] == 0
    for i, changed in enumerate(
        ("data.max_prompt_length=32", "loss.ld_alpha=0.5", "train.bf16=true", "train.packing=false")
    ):
        run = train(
            load_cfg(tiny_model_dir, tmp_path / f"r{i + 2}", *common, changed, "train.precompute_ref=true")
        )
        stats = json.loads((run.run_dir / "summary.json").read_text())["reference"]
        assert stats["train"]["reused"] == 0 and stats["train"]["computed"] == 3, changed


@pytest.mark.slow
def test_bf16_step_one_is_ln2_with_the_cached_reference(tmp_path, tiny_model_dir):
    """The cache holds the very batches the loop runs, so even in bf16 the policy equals its reference at
    step 1 (a cache computed in other batches rounds differently: 0.6908 on the embedded model)."""
    run = train(
        load_cfg(
            tiny_model_dir,
            tmp_path / "r",
            "train.bf16=true",
            "train.precompute_ref=true",
            "train.prefix_sharing=true",
            "train.packing=true",
            f"train.ref_cache_dir={tmp_path / 'c'}",
        )
    )
    assert run.history[0]["loss"] == pytest.approx(0.6931471805599453, abs=1e-7)
    assert run.initial_eval["eval/loss"] == pytest.approx(0.6931471805599453, abs=1e-7)


# ---- starting points: an SFT adapter (model.adapter) and a separate reference checkpoint (model.reference)


@pytest.fixture(scope="module")
def sft_adapter(tiny_model_dir, tmp_path_factory):
    """A LoRA adapter trained a few steps (SFT on the chosen completions): a start that is not the base."""
    run = tmp_path_factory.mktemp("sft") / "run"
    result = train(
        load_cfg(tiny_model_dir, run, "loss.type=[sft]", "train.max_steps=3", "train.save_final=true")
    )
    return result.checkpoint


@pytest.mark.slow
@pytest.mark.parametrize("precompute", ["false", "true"])
def test_training_from_an_adapter_starts_at_ln2_against_that_adapter(
    tmp_path, tiny_model_dir, sft_adapter, precompute
):
    flags = [f"model.adapter={sft_adapter}", f"train.precompute_ref={precompute}"]
    history = train(load_cfg(tiny_model_dir, tmp_path / "sft-start", *flags)).history
    assert history[0]["loss"] == pytest.approx(0.6931471805599453, abs=1e-6)  # pi_ref = the starting adapter
    against_base = train(
        load_cfg(tiny_model_dir, tmp_path / "base-ref", *flags, "model.reference=base")
    ).history
    assert abs(against_base[0]["loss"] - 0.6931471805599453) > 1e-4  # the adapter already moved the policy
    assert history[0]["logps/chosen"] == pytest.approx(
        against_base[0]["logps/chosen"], abs=1e-5
    )  # same policy


@pytest.mark.slow
def test_a_separate_reference_checkpoint_is_the_reference(tmp_path, tiny_model_dir):
    # full fine-tuning of the tiny model against itself given as a separate checkpoint: step 1 is ln 2, and the
    # same run as with the default frozen copy
    copy = train(load_cfg(tiny_model_dir, tmp_path / "copy", "lora.enabled=false")).history
    separate = train(
        load_cfg(
            tiny_model_dir, tmp_path / "separate", "lora.enabled=false", f"model.reference={tiny_model_dir}"
        )
    ).history
    assert separate[0]["loss"] == pytest.approx(0.6931471805599453, abs=1e-6)
    for a, b in zip(strip(copy), strip(separate), strict=True):
        assert b == pytest.approx(a, rel=1e-6, abs=1e-7)


@pytest.mark.slow
def test_starting_point_mistakes_end_in_one_line(tmp_path, tiny_model_dir, capsys):
    code = main(cli_args(tiny_model_dir, tmp_path / "a", f"model.adapter={tmp_path / 'nope'}"))
    assert code == 2 and "model.adapter=" in capsys.readouterr().err
    code = main(cli_args(tiny_model_dir, tmp_path / "b", f"model.adapter={tiny_model_dir}"))
    err = capsys.readouterr().err
    assert code == 2 and "no adapter_config.json" in err
    code = main(cli_args(tiny_model_dir, tmp_path / "c", "lora.enabled=false", f"model.adapter={tmp_path}"))
    assert code == 2 and "needs lora.enabled=true" in capsys.readouterr().err
    code = main(cli_args(tiny_model_dir, tmp_path / "d", f"model.reference={tmp_path / 'gone'}"))
    assert code == 2 and "model.reference" in capsys.readouterr().err
    assert not any((tmp_path / x).exists() for x in "abcd")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["continue", "merge"])
def test_the_reference_of_an_sft_adapter_is_the_merged_sft_model(tmp_path, tiny_model_dir, sft_adapter, mode):
    """Both adapter modes start at ln 2, and pi_ref's log-probs are the merged SFT model's (1e-5 per token)."""
    from dpokit import models
    from dpokit.attention import enable_blocks
    from dpokit.logps import CompletionLogps
    from dpokit.reference import for_training
    from dpokit.session import setup

    cfg = load_cfg(
        tiny_model_dir, tmp_path / mode, f"model.adapter={sft_adapter}", f"model.adapter_mode={mode}"
    )
    s = setup(cfg)
    batch = s.batch(s.data.train, list(range(4)))
    ref = for_training(cfg, s.policy, s.reference_model).sequence_logps(batch)
    merged = models.load_adapter(
        models.load_model(str(tiny_model_dir)), str(sft_adapter), False
    ).merge_and_unload()
    enable_blocks(merged)  # the run's layout attends per document
    with torch.no_grad():
        want = batch.sequence_sums(CompletionLogps(merged.eval())(*batch.model_args))
    per_token = (ref - want).abs() / batch.completion_lengths()  # sums of up to ~900 fp32 log-probs
    assert per_token.max() < 1e-5, per_token
    assert (s.reference_model is None) == (mode == "merge")  # merge: adapters off, no second copy
    history = train(cfg).history
    assert history[0]["loss"] == pytest.approx(0.6931471805599453, abs=1e-6)


@pytest.mark.slow
def test_a_merge_mode_run_exports_and_evaluates_on_its_merged_base(tmp_path, tiny_model_dir, sft_adapter):
    from transformers import AutoModelForCausalLM

    from dpokit.exporter import export
    from dpokit.trained import load_trained

    run = tmp_path / "merge"
    flags = [
        f"model.adapter={sft_adapter}",
        "model.adapter_mode=merge",
        "train.save_final=true",
        "train.lr=5e-3",
    ]
    result = train(load_cfg(tiny_model_dir, run, *flags))
    c = load_trained(str(run), reference=True, device="cpu")
    merged = AutoModelForCausalLM.from_pretrained(export(str(run), str(tmp_path / "out")).folder).eval()
    ids = torch.tensor([[5, 40, 41, 42, 43, 44, 45, 46]])
    with torch.no_grad():
        assert (merged(ids).logits - c.model(ids).logits).abs().max() < 1e-4
    assert result.final_eval is not None


@pytest.mark.slow
def test_a_reference_other_than_the_start_is_said_with_its_measured_gap(
    tmp_path, tiny_model_dir, sft_adapter
):
    run = tmp_path / "other"
    train(load_cfg(tiny_model_dir, run, f"model.adapter={sft_adapter}", "model.reference=base"))
    warnings = json.loads((run / "summary.json").read_text())["warnings"]
    said = [w for w in warnings if "is not the policy's starting point" in w]
    assert len(said) == 1 and "mean log-ratio" in said[0]
    loss = float(said[0].split("the loss is ")[1].split(" ")[0])
    first = json.loads((run / "metrics.jsonl").read_text().splitlines()[1])  # line 0: the initial eval
    assert loss == pytest.approx(first["loss"], abs=1e-4)  # the same first batch, dropout off either way


@pytest.mark.slow
def test_eval_of_a_run_measures_against_its_separate_reference(tmp_path, tiny_model_dir, sft_adapter):
    """model.reference = the merged SFT model (exported): training starts off ln 2 (the policy is the base),
    and `dpokit eval` of the run loads that same reference, not the policy with adapters off."""
    from transformers import AutoModelForCausalLM

    from dpokit.exporter import export
    from dpokit.trained import load_trained

    sft = export(str(sft_adapter), str(tmp_path / "sft")).folder
    run = tmp_path / "run"
    result = train(load_cfg(tiny_model_dir, run, f"model.reference={sft}", "train.save_final=true"))
    assert abs(result.history[0]["loss"] - 0.6931471805599453) > 1e-4
    c = load_trained(str(run), reference=True, device="cpu")
    assert not c.reference.disable_adapters
    got = c.reference.network.model.state_dict()
    want = AutoModelForCausalLM.from_pretrained(sft).state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
