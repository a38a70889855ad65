"""The exported GGUF read by a real consumer, llama.cpp (llama-cpp-python, installed by `make llama-cpp`,
which `make test` runs): the tiny model's F32 export gives transformers' logits and greedy tokens; the
embedded SmolLM2's export tokenizes held-out text exactly as its Hugging Face tokenizer does.
benchmarks/gguf_check.py measures the rest (F16 greedy matches, Q8_0 / Q4_1 KL) on the demo's policy."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from dpokit.data.prompts import load_prompts
from dpokit.exporter import export

try:
    from llama_cpp import Llama
except ImportError:  # pragma: no cover - the optional extra
    Llama = None
    if os.environ.get("CI") == "true":
        raise
pytestmark = pytest.mark.skipif(Llama is None, reason="llama-cpp-python is not installed: make llama-cpp")


def open_gguf(path, vocab_only: bool = False):
    return Llama(
        model_path=str(path), n_ctx=256, logits_all=True, verbose=False, n_threads=2, vocab_only=vocab_only
    )


@pytest.mark.slow
def test_llama_cpp_runs_the_smollm2_export_like_transformers(tmp_path):
    """F32: llama.cpp's logits are transformers' (the tensor names, the q/k row order, the hyper-parameters);
    the tiny model cannot take this test: its single-byte vocabulary has no merges, which llama.cpp needs."""
    from dpokit import models

    folder = models.resolve_model_path(models.SMOLLM2_ALIAS)
    done = export(folder, str(tmp_path / "merged"), gguf=str(tmp_path / "smollm2.gguf"), gguf_type="f32")
    merged = AutoModelForCausalLM.from_pretrained(done.folder).eval()
    tokenizer = models.load_tokenizer(str(done.folder))
    model = open_gguf(done.gguf)
    for text in load_prompts("builtin:reviews", "eval", 4):
        ids = tokenizer(text)["input_ids"]
        model.reset()
        model.eval(ids)
        ours = np.array(model.scores[: len(ids)])
        with torch.no_grad():
            want = merged(torch.tensor([ids])).logits[0].numpy()
        # llama.cpp keeps its KV cache in f16 by default: 0.016 measured, on logits of magnitude ~20
        assert np.abs(ours - want).max() < 0.05, np.abs(ours - want).max()
        assert (ours.argmax(-1) == want.argmax(-1)).all()
    model.close()


@pytest.mark.slow
def test_llama_cpp_tokenizes_the_smollm2_export_like_transformers(tmp_path):
    from dpokit import models

    folder = models.resolve_model_path(models.SMOLLM2_ALIAS)
    done = export(folder, str(tmp_path / "merged"), gguf=str(tmp_path / "smollm2.gguf"), gguf_type="q8_0")
    tokenizer = models.load_tokenizer(str(done.folder))
    vocab = open_gguf(done.gguf, vocab_only=True)
    texts = load_prompts("builtin:reviews", "eval", 16) + [
        "Numbers 1234 and   spaces, émigré café, <|im_start|>user\nhi<|im_end|>\n"
    ]
    for text in texts:
        want = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert vocab.tokenize(text.encode(), add_bos=False, special=True) == want, text
    vocab.close()
