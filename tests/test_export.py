"""`dpokit export`: a LoRA run merged into a plain Hugging Face folder equal to the adapter model, full
fine-tuning copied, GGUF files that transformers' GGUF loader reads back to the same logits (f32) or close
(f16, q8_0, q4_1), the Ollama Modelfile, the export used again by `train` and `eval`, and clear errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from dpokit.cli import main
from dpokit.data.prompts import load_prompts
from dpokit.errors import UsageError
from dpokit.exporter import export
from dpokit.loop import train
from dpokit.models import load_adapter, load_model, load_tokenizer
from helpers import cli_args, copy_run, load_cfg


@pytest.fixture(scope="module")
def lora_run(tiny_lora_run, tmp_path_factory):
    """The shared tiny LoRA run, copied for this module (evaluations write into it)."""
    run = copy_run(tiny_lora_run, tmp_path_factory.mktemp("export") / "run")
    return run, run / tiny_lora_run.checkpoint.relative_to(tiny_lora_run.run_dir)


def heldout_ids(tokenizer, n: int = 4) -> list[torch.Tensor]:
    """Held-out text: the demo's evaluation openings, with a chat-formatted one."""
    texts = load_prompts("builtin:reviews", "eval", n)
    texts.append(tokenizer.apply_chat_template([{"role": "user", "content": texts[0]}], tokenize=False))
    return [torch.tensor([tokenizer(t)["input_ids"][:96]]) for t in texts]


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(x).logits[0] for x in ids])


@pytest.mark.slow
def test_lora_merged_folder_loads_without_peft_and_equals_the_adapter_model(
    lora_run, tiny_model_dir, tmp_path
):
    run, ckpt = lora_run
    done = export(str(run), str(tmp_path / "merged"))
    assert not (done.folder / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(done.folder).eval()  # transformers alone
    adapted = load_adapter(load_model(str(tiny_model_dir)), str(ckpt), trainable=False).eval()
    tokenizer = load_tokenizer(str(done.folder))
    ids = heldout_ids(tokenizer)
    want = logits(adapted, ids)
    assert (logits(merged, ids) - want).abs().max() < 1e-4
    assert (
        logits(load_model(str(tiny_model_dir)).eval(), ids) - want
    ).abs().max() > 1e-3  # the adapter mattered
    assert tokenizer.chat_template and (done.folder / "generation_config.json").is_file()
    # a checkpoint folder works too; --dtype rounds the folder only, the GGUF is written from the fp32 merge
    half = export(
        str(ckpt),
        str(tmp_path / "bf16"),
        dtype="bf16",
        gguf=str(tmp_path / "g" / "f32.gguf"),
        gguf_type="f32",
    )
    assert AutoModelForCausalLM.from_pretrained(half.folder).dtype == torch.bfloat16
    back = AutoModelForCausalLM.from_pretrained(
        str(tmp_path / "g"), gguf_file="f32.gguf", dtype=torch.float32
    )
    assert (logits(back.eval(), ids) - want).abs().max() < 1e-4


@pytest.mark.slow
def test_full_finetuning_export_copies_the_weights(tiny_model_dir, tmp_path):
    result = train(load_cfg(tiny_model_dir, tmp_path / "full", "lora.enabled=false", "train.save_final=true"))
    done = export(str(tmp_path / "full"), str(tmp_path / "out"))
    a = AutoModelForCausalLM.from_pretrained(done.folder).state_dict()
    b = AutoModelForCausalLM.from_pretrained(result.checkpoint).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("kind", "tolerance"), [("f32", 1e-5), ("f16", 2e-2), ("bf16", 5e-2), ("q8_0", 0.1), ("q4_1", 1.0)]
)
def test_gguf_reads_back_to_the_merged_logits(lora_run, tmp_path, kind, tolerance):
    run, _ = lora_run
    gguf = tmp_path / f"policy-{kind}.gguf"
    done = export(str(run), str(tmp_path / "merged"), gguf=str(gguf), gguf_type=kind)
    merged = AutoModelForCausalLM.from_pretrained(done.folder).eval()
    back = AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file=gguf.name, dtype=torch.float32
    ).eval()
    ids = heldout_ids(load_tokenizer(str(done.folder)))
    diff = (logits(back, ids) - logits(merged, ids)).abs().max()
    assert diff < tolerance, diff
    modelfile = done.modelfile.read_text()
    assert modelfile.startswith(f"FROM ./{gguf.name}\n") and 'PARAMETER stop "<|im_end|>"' in modelfile
    assert "{{ range .Messages }}<|im_start|>{{ .Role }}" in modelfile


@pytest.mark.slow
def test_the_export_trains_and_evaluates_again(lora_run, tmp_path, capsys):
    run, _ = lora_run
    gguf = tmp_path / "policy.gguf"
    export(str(run), str(tmp_path / "merged"), gguf=str(gguf), gguf_type="f32")
    for name, model in (("folder", tmp_path / "merged"), ("gguf", gguf)):
        args = cli_args(model, tmp_path / f"again-{name}", "train.max_steps=1")
        assert main(args) == 0, capsys.readouterr().err
        assert (
            main(
                [
                    "eval",
                    str(model),
                    "--ref",
                    str(model),
                    "--data",
                    "builtin:demo",
                    "--out",
                    str(tmp_path / name),
                ]
            )
            == 0
        )
        results = json.loads((tmp_path / name / "eval.json").read_text())
        assert results["preference"]["loss"] == pytest.approx(0.6931, abs=1e-4)  # policy == reference


@pytest.mark.slow
def test_export_mistakes_end_in_one_line(lora_run, tmp_path, capsys, monkeypatch):
    run, _ = lora_run
    assert main(["export", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "no such folder" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    assert main(["export", str(run), "--out", str(tmp_path / "full")]) == 2
    assert "not empty" in capsys.readouterr().err

    from dpokit import models

    real = models.load_model

    def quantized(path, *a, **k):
        model = real(path, *a, **k)
        model.config.quantization_config = {"quant_method": "bitsandbytes", "load_in_4bit": True}
        return model

    monkeypatch.setattr(models, "load_model", quantized)
    with pytest.raises(UsageError, match="is quantized"):
        export(str(run), str(tmp_path / "q"))
    assert not (tmp_path / "q").exists()


@pytest.mark.slow
def test_cli_export_prints_where_everything_went(lora_run, tmp_path, capsys):
    run, _ = lora_run
    code = main(["export", str(run), "--out", str(tmp_path / "m"), "--gguf", str(tmp_path / "m.gguf")])
    out = capsys.readouterr().out
    assert code == 0 and "merged model:" in out and "ollama create NAME -f" in out and "export took" in out
    shutil.rmtree(tmp_path / "m")


@pytest.mark.slow
def test_smollm2_gguf_carries_the_shipped_files_tokenizer_and_tensor_names(tmp_path):
    """The embedded model exported to GGUF: the same vocabulary, token types, merges, special ids,
    pre-tokenizer, chat template, hyper-parameters and tensor names as the GGUF it was converted from."""
    import gguf

    from dpokit import models

    folder = models.resolve_model_path(models.SMOLLM2_ALIAS)
    done = export(folder, str(tmp_path / "merged"), gguf=str(tmp_path / "smollm2.gguf"), gguf_type="q8_0")
    shipped, ours = gguf.GGUFReader(str(models.smollm2_gguf_path())), gguf.GGUFReader(str(done.gguf))
    for key in shipped.fields:
        if key.startswith(("tokenizer.", "llama.")):
            assert ours.fields[key].contents() == shipped.fields[key].contents(), key
    assert sorted(t.name for t in ours.tensors) == sorted(t.name for t in shipped.tensors)


@pytest.mark.slow
def test_exports_and_checkpoints_get_the_usual_permissions_and_a_model_card(lora_run, tmp_path):
    """Under umask 022 every folder is 0755 and every file 0644 (a server running as another user reads
    them); the export and each checkpoint carry a README.md card naming the base model as the user gave it."""
    import os

    from dpokit.modelcard import version
    from dpokit.rundir import Run

    run, _ = lora_run
    old = os.umask(0o022)
    try:
        out = export(str(run), str(tmp_path / "merged")).folder
    finally:
        os.umask(old)
    ckpt = Run(run).final_checkpoint
    for folder in (out, ckpt):
        assert folder.stat().st_mode & 0o777 == 0o755
        assert {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir() if p.is_file()} == {
            p.name: 0o644 for p in folder.iterdir() if p.is_file()
        }
    card = (out / "README.md").read_text()
    cfg = Run(run).config
    assert f"# {cfg.model.name}, sigmoid (dpokit)" in card and "library_name: transformers" in card
    assert "a LoRA adapter merged into its base" in card and f"(step-{ckpt.name.split('-')[1]})" in card
    assert "18 training pairs, 6 held out" in card and f"dpokit {version()}" in card
    assert "| loss |" in card and "- lora" in card
    adapter_card = (ckpt / "README.md").read_text()
    assert "library_name: peft" in adapter_card and "AutoPeftModelForCausalLM" in adapter_card
    state = json.loads((ckpt / "dpokit_state.json").read_text())
    assert state["base_model"] == cfg.model.name  # the adapter's own field holds the local cache path


def test_a_cards_base_model_is_the_name_the_user_gave():
    from dpokit.modelcard import base_model

    assert base_model("smollm2-135m-instruct")[0] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert base_model("Qwen/Qwen2.5-0.5B-Instruct")[0] == "Qwen/Qwen2.5-0.5B-Instruct"
    assert base_model("tiny-random")[0] is None and base_model("/some/local/folder")[0] is None
