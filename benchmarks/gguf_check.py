"""The exported GGUF in a real consumer: llama.cpp (through llama-cpp-python, `make llama-cpp`).

Exports a run (default: the embedded SmolLM2 with the demo's DPO adapter, RUN given as argument) to a merged
folder and GGUF files, and compares llama.cpp with transformers on held-out prompts (the demo's evaluation
openings, as chat messages):

- F16: greedy continuations of --prompts prompts x --tokens tokens, token for token (mismatches counted,
  with where the first one happens and the two models' logit gap there), and the largest logit difference
  over the prompts and continuations;
- Q8_0 and Q4_1: the mean KL(transformers merged || llama.cpp) per token over the same text, next to the
  same figure for the shipped SmolLM2 Q4_1 file (llama.cpp) against its dequantized weights (transformers).

    python benchmarks/gguf_check.py runs/demo-.../            # a LoRA run of SmolLM2 (make demo writes one)
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def llama(path: Path):
    from llama_cpp import Llama

    return Llama(model_path=str(path), n_ctx=512, logits_all=True, verbose=False, n_threads=2, seed=0)


def llama_logits(model, ids: list[int]) -> np.ndarray:
    """(len(ids), vocab) next-token logits of llama.cpp after each position."""
    model.reset()
    model.eval(ids)
    return np.array(model.scores[: len(ids)], dtype=np.float32)


def hf_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def greedy_hf(model, ids: list[int], n: int, eos: set[int]) -> list[int]:
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            do_sample=False,
            max_new_tokens=n,
            eos_token_id=sorted(eos),
            pad_token_id=sorted(eos)[0],
        )[0, len(ids) :].tolist()
    end = next((i for i, t in enumerate(out) if t in eos), None)
    return out if end is None else out[: end + 1]


def greedy_llama(model, ids: list[int], n: int, eos: set[int]) -> list[int]:
    model.reset()
    model.eval(ids)
    out = []
    for _ in range(n):
        tok = int(np.argmax(model.scores[model.n_tokens - 1]))
        out.append(tok)
        if tok in eos:
            break
        model.eval([tok])
    return out


def mean_kl(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    p = torch.log_softmax(torch.from_numpy(p_logits).double(), -1)
    q = torch.log_softmax(torch.from_numpy(q_logits).double(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="a run dir or checkpoint of SmolLM2 (LoRA or full)")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=32)
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM

    from dpokit import models
    from dpokit.data.prompts import load_prompts
    from dpokit.exporter import export
    from dpokit.tokenize import encode_prompt

    work = Path(tempfile.mkdtemp(prefix="gguf-check-"))
    t0 = time.perf_counter()
    done = export(args.run, str(work / "merged"), gguf=str(work / "f16.gguf"), gguf_type="f16")
    export_s = time.perf_counter() - t0
    merged = AutoModelForCausalLM.from_pretrained(done.folder, dtype=torch.float32).eval()
    tokenizer = models.load_tokenizer(str(done.folder))
    eos = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")}
    prompts = [
        encode_prompt([{"role": "user", "content": f"Continue this movie review: {p}"}], tokenizer)
        for p in load_prompts("builtin:reviews", "eval", args.prompts)
    ]
    report: dict = {"export_s": round(export_s, 1), "prompts": len(prompts), "tokens": args.tokens}

    f16 = llama(done.gguf)
    same, first_diffs, max_logit = 0, [], 0.0
    texts = []
    for ids in prompts:
        a, b = greedy_hf(merged, ids, args.tokens, eos), greedy_llama(f16, ids, args.tokens, eos)
        texts.append(ids + a)
        if a == b:
            same += 1
        else:
            k = next(i for i, (x, y) in enumerate(zip(a + [-1], b + [-2], strict=False)) if x != y)
            gap = hf_logits(merged, ids + a[:k])[-1]
            top = np.sort(gap)[-2:]
            first_diffs.append({"position": k, "hf_top2_gap": float(top[1] - top[0])})
        diff = np.abs(hf_logits(merged, ids + a) - llama_logits(f16, ids + a)).max()
        max_logit = max(max_logit, float(diff))
    report["f16"] = {"greedy_identical": same, "mismatches": first_diffs, "max_logit_diff": max_logit}

    for kind in ("q8_0", "q4_1"):
        path = work / f"{kind}.gguf"
        export(args.run, str(work / f"merged-{kind}"), gguf=str(path), gguf_type=kind)
        q = llama(path)
        kls = [mean_kl(hf_logits(merged, t), llama_logits(q, t)) for t in texts]
        report[kind] = {"mean_kl_per_token": float(np.mean(kls))}
        q.close()

    shipped = llama(models.smollm2_gguf_path())
    dequantized = models.load_model(models.resolve_model_path(models.SMOLLM2_ALIAS)).eval()
    kls = [mean_kl(hf_logits(dequantized, t), llama_logits(shipped, t)) for t in texts]
    report["shipped_q4_1_vs_its_dequantized_weights"] = {"mean_kl_per_token": float(np.mean(kls))}
    for model in (f16, shipped):
        model.close()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
