"""Sampling completions (batched, KV cache) and scoring them under the policy and the reference.

Prompts are tokenized exactly as in training (`encode_prompt`: chat template for message lists), so a
sampled completion followed by EOS is a sequence the trainer could have seen. A completion ends at the
first end-of-sequence token, which is kept in its ids (it is a sampled token: its log-prob counts in the
KL) and dropped from its text.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dpokit.attention import enable_blocks
from dpokit.batching import Doc, build_batch
from dpokit.logps import CompletionLogps, sum_by_sequence
from dpokit.progress import Progress
from dpokit.reference import eval_mode
from dpokit.tokenize import encode_prompt


class SamplingError(ValueError):
    """Sampling settings that cannot work; the message names the setting."""


@dataclass(frozen=True)
class SamplingSettings:
    max_new_tokens: int = 48
    temperature: float = 1.0
    top_p: float = 1.0
    batch_size: int = 64
    """Sequences generated together (prompts x samples)."""
    seed: int = 0
    bf16: bool = False
    """Autocast the forward passes to bf16 (the weights stay as loaded)."""

    def __post_init__(self):
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise SamplingError(
                f"max_new_tokens={self.max_new_tokens}, batch_size={self.batch_size}: both must be >= 1"
            )
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise SamplingError(
                f"temperature={self.temperature} must be >= 0 (0 = greedy), top_p={self.top_p} in (0, 1]"
            )


@dataclass
class Sample:
    prompt: object
    """The prompt as given (text or chat messages)."""
    completion: str
    prompt_ids: list[int]
    completion_ids: list[int]
    """Sampled token ids, ending with the EOS token when the model produced one."""
    finished: bool
    """Whether the model ended the completion (EOS) before max_new_tokens."""


def eos_ids(model, tokenizer) -> list[int]:
    ids = model.generation_config.eos_token_id if model.generation_config is not None else None
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


@torch.no_grad()
def sample(
    model,
    tokenizer,
    prompts: list,
    n: int,
    settings: SamplingSettings,
    progress: bool = True,
    label: str = "sampling",
) -> list[list[Sample]]:
    """`n` completions for each prompt: result[i][k] is the k-th sample of prompts[i].

    Sequences are grouped by prompt length (less left padding) and generated `settings.batch_size` at a
    time with the model's KV cache; each batch draws from its own generator state (seed + batch number),
    so the result does not depend on what ran before.
    """
    encoded = [encode_prompt(p, tokenizer) for p in prompts]
    jobs = sorted(
        ((i, k) for i in range(len(prompts)) for k in range(n)), key=lambda j: (len(encoded[j[0]]), j)
    )
    stop = eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[0]
    device = next(model.parameters()).device
    out: list[list[Sample | None]] = [[None] * n for _ in prompts]
    with eval_mode(model):
        with Progress(label, len(jobs), "sequences", progress) as bar:
            for b, start in enumerate(range(0, len(jobs), settings.batch_size)):
                chunk = jobs[start : start + settings.batch_size]
                width = max(len(encoded[i]) for i, _ in chunk)
                input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
                attention = torch.zeros((len(chunk), width), dtype=torch.long)
                for row, (i, _) in enumerate(chunk):  # left padding: every prompt ends at the last column
                    ids = encoded[i]
                    input_ids[row, width - len(ids) :] = torch.tensor(ids)
                    attention[row, width - len(ids) :] = 1
                torch.manual_seed(settings.seed * 1_000_003 + b)
                sampling = settings.temperature > 0
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=settings.bf16):
                    generated = model.generate(
                        input_ids=input_ids.to(device),
                        attention_mask=attention.to(device),
                        do_sample=sampling,
                        temperature=settings.temperature if sampling else None,
                        top_p=settings.top_p if sampling else None,
                        top_k=0 if sampling else None,
                        max_new_tokens=settings.max_new_tokens,
                        eos_token_id=stop,
                        pad_token_id=pad,
                    )[:, width:].cpu()
                for row, (i, k) in enumerate(chunk):
                    ids = generated[row].tolist()
                    end = next((t for t, tok in enumerate(ids) if tok in stop), None)
                    ids = ids if end is None else ids[: end + 1]
                    text_ids = ids if end is None else ids[:-1]
                    text = tokenizer.decode(text_ids, skip_special_tokens=True)
                    out[i][k] = Sample(prompts[i], text, encoded[i], ids, end is not None)
                bar.advance(len(chunk))
    return out  # type: ignore[return-value]


@torch.no_grad()
def sequence_logps(
    model,
    samples: list[list[Sample]],
    pad_id: int,
    batch_size: int = 16,
    bf16: bool = False,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """(num_prompts, n) log-probs of each sampled completion (summed over its tokens) under `model`
    (temperature 1, no top-p: the model's own distribution). The n samples of a prompt share one
    prompt forward (prefix sharing), with per-document attention where the model allows it."""
    clp = CompletionLogps(model, chunk_size, bf16)
    mask = "blocks" if enable_blocks(model) else "dense"
    device = next(model.parameters()).device
    n = len(samples[0]) if samples else 0
    rows = []
    with eval_mode(model):
        for start in range(0, len(samples), batch_size):
            group = samples[start : start + batch_size]
            docs = [
                Doc(g[0].prompt_ids, tuple((s.completion_ids, j * n + k) for k, s in enumerate(g)))
                for j, g in enumerate(group)
            ]
            batch = build_batch(docs, [[d] for d in range(len(docs))], pad_id, [1.0] * len(docs), mask).to(
                device
            )
            tok = clp(*batch.model_args)
            rows.append(
                sum_by_sequence(tok.float(), batch.seq_index, batch.num_seqs).view(len(group), n).cpu()
            )
    return torch.cat(rows) if rows else torch.zeros(0, n)
