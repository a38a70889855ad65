"""Sampling completions (batched, KV cache) and scoring them under the policy and the reference.

Prompts are tokenized exactly as in training (`encode_prompt`: chat template for message lists), so a
sampled completion followed by EOS is a sequence the trainer could have seen. A completion ends at the
first end-of-sequence token, which is kept in its ids (it is a sampled token: its log-prob counts in the
KL) and dropped from its text.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicLayer

from dpokit.attention import enable_blocks
from dpokit.batching import Doc, build_batch
from dpokit.errors import SamplingError
from dpokit.logps import CompletionLogps, sum_by_sequence
from dpokit.progress import Progress
from dpokit.reference import eval_mode
from dpokit.tokenize import encode_prompt


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

    The n samples of a prompt share one prefill: the prompt's keys and values are computed once and
    repeated n times in the cache, so a prompt costs one forward however many samples it gets. Prompts of
    similar length go together (little left padding), settings.batch_size sequences at a time; sequences
    that ended leave the batch. Each batch draws from its own generator (seed + batch number), so the
    result does not depend on what ran before, nor on the global RNG.
    """
    encoded = [encode_prompt(p, tokenizer) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: (len(encoded[i]), i))
    per_batch = max(1, settings.batch_size // n)
    stop = eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[0]
    out: list[list[Sample | None]] = [[None] * n for _ in prompts]
    with eval_mode(model), Progress(label, len(prompts) * n, "sequences", progress) as bar:
        for b, start in enumerate(range(0, len(order), per_batch)):
            chunk = order[start : start + per_batch]
            generator = torch.Generator().manual_seed(settings.seed * 1_000_003 + b)
            rows = _decode(model, [encoded[i] for i in chunk], n, settings, stop, pad, generator)
            for c, i in enumerate(chunk):
                for k in range(n):
                    ids = rows[c * n + k]
                    finished = bool(ids) and ids[-1] in stop
                    text = tokenizer.decode(ids[:-1] if finished else ids, skip_special_tokens=True)
                    out[i][k] = Sample(prompts[i], text, encoded[i], ids, finished)
            bar.advance(len(chunk) * n)
    return out  # type: ignore[return-value]


def _decode(model, prompts: list[list[int]], n: int, settings: SamplingSettings, stop, pad, generator):
    """Token ids sampled after each prompt, n per prompt (prompt-major), each ending at its first stop
    token (kept) or at max_new_tokens."""
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, ids in enumerate(prompts):  # left padding: every prompt ends at the last column
        input_ids[row, width - len(ids) :] = torch.tensor(ids)
        mask[row, width - len(ids) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    input_ids, mask, positions = input_ids.to(device), mask.to(device), positions.to(device)
    stop_ids = torch.tensor(stop, device=device)
    step_kwargs = {"decode_step": True} if enable_blocks(model) else {}
    tokens: list[list[int]] = [[] for _ in range(len(prompts) * n)]
    # One autocast region for the whole batch, with the weights' casts cached (see cast_once).
    with cast_once(model, settings.bf16), torch.autocast(device.type, torch.bfloat16, enabled=settings.bf16):
        prefill = model(
            input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1
        )
        cache = preallocated(prefill.cache, width + settings.max_new_tokens)
        cache.batch_repeat_interleave(
            n
        )  # (P, ...) -> (P * n, ...): the samples of a prompt share its prefill
        logits = prefill.logits[:, -1].float().repeat_interleave(n, dim=0)
        mask, next_pos = mask.repeat_interleave(n, dim=0), positions[:, -1].repeat_interleave(n, dim=0) + 1
        live = torch.arange(len(prompts) * n, device=device)  # the sequence of each batch row
        for _ in range(settings.max_new_tokens):
            chosen = _draw(logits, settings, generator).to(device)
            for seq, tok in zip(live.tolist(), chosen.tolist(), strict=True):
                tokens[seq].append(tok)
            going = ~torch.isin(chosen, stop_ids)
            if not bool(going.any()):
                break
            if not bool(going.all()):  # ended sequences leave the batch
                keep = going.nonzero().squeeze(1)
                cache.batch_select_indices(keep)
                live, chosen, mask, next_pos = live[keep], chosen[keep], mask[keep], next_pos[keep]
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            step = model(
                input_ids=chosen.unsqueeze(1),
                attention_mask=mask,
                position_ids=next_pos.unsqueeze(1),
                cache=cache,
                use_cache=True,
                **step_kwargs,
            )
            logits, next_pos = step.logits[:, -1].float(), next_pos + 1
    return tokens


@contextlib.contextmanager
def cast_once(model, enabled: bool):
    """Autocast keeps the bf16 copy of a weight for the rest of its region only when the weight requires
    grad; frozen weights would be cast again at every decoding step (22% of a SmolLM2 decoding step's time in a profile on CPU).
    Marked as requiring grad for the duration (under no_grad nothing is recorded), then restored."""
    frozen = (
        [p for p in model.parameters() if not p.requires_grad and p.dtype == torch.float32] if enabled else []
    )
    for p in frozen:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(False)


class _Preallocated(DynamicLayer):
    """A cache layer that writes new keys/values into a buffer of the final length instead of
    concatenating (which copies the whole cache at every step)."""

    def __init__(self, layer: DynamicLayer, capacity: int):
        super().__init__()
        rows, heads, length, dim = layer.keys.shape
        self.k_buf = layer.keys.new_empty(rows, heads, capacity, dim)
        self.v_buf = layer.values.new_empty(rows, heads, capacity, layer.values.shape[-1])
        self.k_buf[:, :, :length], self.v_buf[:, :, :length] = layer.keys, layer.values
        self.length, self.device, self.is_initialized = length, layer.keys.device, True
        self._views()

    def _views(self) -> None:
        self.keys, self.values = self.k_buf[:, :, : self.length], self.v_buf[:, :, : self.length]

    def update(self, key_states, value_states, *args, **kwargs):
        n = key_states.shape[-2]
        self.k_buf[:, :, self.length : self.length + n] = key_states
        self.v_buf[:, :, self.length : self.length + n] = value_states
        self.length += n
        self._views()
        return self.keys, self.values

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.k_buf = self.k_buf.repeat_interleave(repeats, dim=0)
        self.v_buf = self.v_buf.repeat_interleave(repeats, dim=0)
        self._views()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.k_buf, self.v_buf = self.k_buf[indices], self.v_buf[indices]
        self._views()


def preallocated(cache, capacity: int):
    """`cache` (a DynamicCache of full-attention layers) with buffers of `capacity` positions; any other
    cache is returned as it is."""
    if not all(
        type(layer) is DynamicLayer and layer.is_initialized for layer in getattr(cache, "layers", [])
    ):
        return cache
    cache.layers = [_Preallocated(layer, capacity) for layer in cache.layers]
    return cache


def _draw(logits: torch.Tensor, settings: SamplingSettings, generator: torch.Generator) -> torch.Tensor:
    """(B,) one token per row: greedy at temperature 0, else from softmax(logits / T) cut to the top-p
    nucleus (the smallest set of tokens whose probability reaches top_p)."""
    logits = logits.cpu()
    if settings.temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits if settings.temperature == 1 else logits / settings.temperature, dim=-1)
    if settings.top_p < 1.0:
        sorted_probs, index = probs.sort(dim=-1, descending=True)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of the tokens ranked above each one
        sorted_probs[before >= settings.top_p] = 0.0
        probs = torch.zeros_like(probs).scatter_(-1, index, sorted_probs)
    # Inverse-CDF draw: one uniform per row against the cumulative distribution (float64, so the rounding
    # of 50k partial sums moves no token's mass noticeably). torch.multinomial draws one exponential per
    # vocabulary entry instead: on CPU it took 38% of a decoding step in a profile.
    cdf = probs.double().cumsum(dim=-1)
    u = torch.rand(probs.shape[0], 1, generator=generator, dtype=torch.float64) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp(max=probs.shape[-1] - 1)


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
