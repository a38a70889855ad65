"""Evaluation: did training improve the model, and at what distance from the reference? One stage, called by
the training loop (held-out pairs at every evaluation), by `dpokit eval` and by the demo; it returns its
metrics and samples and fills nothing in place.

Two kinds of evidence, both against the reference pi_ref (the starting model):

- preference data: held-out accuracy and margins of the implicit reward, the mean log-ratio
  log pi/pi_ref of chosen and rejected completions, and a per-token KL estimate on the chosen ones
  (`evaluate_pairs`);
- generation: sample completions from the policy and from the reference, score both with a reward, and
  report mean reward, the policy's win rate over the reference, the sampled KL(pi || pi_ref) per sequence
  and per token, and the length drift (`generation_metrics`).

The sampled KL is sum_t [log pi(y_t | .) - log pi_ref(y_t | .)] over completions y ~ pi, averaged: an
unbiased estimate of the sequence-level KL when sampling at temperature 1 without top-p (the default);
with other sampling settings it is the same statistic, not the KL of the sampling distribution.
"""

from __future__ import annotations

import math
from dataclasses import asdict

import torch

from dpokit.batching import Layout
from dpokit.data import DataError, load_examples
from dpokit.generate import Sample, SamplingSettings, sample, sequence_logps
from dpokit.logps import CompletionLogps
from dpokit.metrics import PairMetrics
from dpokit.objective import Objective
from dpokit.progress import Progress
from dpokit.reference import Reference, eval_mode
from dpokit.rewards import score_samples
from dpokit.trained import Trained


def eval_batches(num_examples: int, size: int, rank: int = 0, world: int = 1) -> list[tuple[list[int], bool]]:
    """The eval batches process `rank` runs, as (example indices, counted). Every process runs the same
    number of forwards, because a DDP forward is a collective (it broadcasts buffers) even under no_grad:
    a process out of batches recomputes batch 0 and drops the result."""
    n_batches = math.ceil(num_examples / size)
    out = []
    for b in range(rank, math.ceil(n_batches / world) * world, world):
        start = (b if b < n_batches else 0) * size
        out.append((list(range(start, min(start + size, num_examples))), b < n_batches))
    return out


@torch.no_grad()
def evaluate_pairs(
    policy,
    reference: Reference | None,
    objective: Objective,
    examples: list,
    collate,
    *,
    batch_size: int,
    accelerator=None,
    sample_pairs: int = 0,
    progress: bool = True,
) -> tuple[dict, list[dict]]:
    """Held-out metrics (means over every example, dropout off) and the per-pair values of the first
    `sample_pairs` pairs (paired losses; they lie in batch 0, which process 0 runs).

    `collate(indices)` builds a batch of `examples` on the policy's device; with an `accelerator` of
    several processes, each runs its share of the batches and the sums are reduced over all of them.
    """
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    sums, samples = PairMetrics(), []
    batches = eval_batches(len(examples), batch_size, rank, world)
    with (
        eval_mode(policy),
        Progress(
            "evaluation", sum(len(b) for b, counted in batches if counted), "pairs", progress and rank == 0
        ) as bar,
    ):
        for b, (indices, counted) in enumerate(batches):
            out, extras = objective(policy, reference, collate(indices))
            if counted:
                sums.add(out, extras)
                bar.advance(len(indices))
            if b == 0 and rank == 0 and sample_pairs and not objective.unpaired:
                samples = pair_samples(out, extras, examples, min(sample_pairs, len(indices)))
    return sums.compute(accelerator), samples


def pair_samples(out, extras: dict, examples: list, k: int) -> list[dict]:
    """Per-pair values of the first `k` pairs of a batch (the log-ratio picture of `dpokit report`)."""
    rows = []
    for i in range(k):
        row = {
            "index": i,
            "loss": float(out.losses[i]),
            "reward_chosen": float(out.chosen_rewards[i]),
            "reward_rejected": float(out.rejected_rewards[i]),
        }
        for key in ("logratio/chosen", "logratio/rejected", "logps/chosen", "logps/rejected"):
            if key in extras:
                row[key.replace("/", "_")] = float(extras[key][i])
        rows.append(row)
    return rows


def preference_metrics(
    c: Trained, data, max_length: int = 1024, max_prompt_length: int = 512, batch_size: int = 8
) -> dict:
    """Accuracy, margins, log-ratios and per-token KL of the chosen completions on preference pairs (a file
    or data.InMemory)."""
    from dpokit.data.prepare import check_scores
    from dpokit.tokenize import tokenize_pairs

    examples, _ = load_examples(data, key="--data")
    check_scores(c.loss.type, examples)
    pairs, stats = tokenize_pairs(examples, c.tokenizer, max_length, max_prompt_length)
    if not pairs:
        where = data.name if hasattr(data, "records") else data
        raise DataError(str(where), f"no pairs left after tokenization ({stats.to_dict()['dropped']})")
    policy = CompletionLogps(c.model, bf16=c.bf16)
    device = next(c.model.parameters()).device
    pad = c.tokenizer.pad_token_id

    layout = c.layout or Layout()

    def collate(indices):
        return layout.pairs([pairs[i] for i in indices], pad, ids=indices).to(device)

    metrics, _ = evaluate_pairs(policy, c.reference, Objective(c.loss), pairs, collate, batch_size=batch_size)
    return {**metrics, "pairs": len(pairs), "dropped": dict(stats.dropped)}


def generation_metrics(
    c: Trained,
    prompts: list,
    reward,
    samples_per_prompt: int = 1,
    settings: SamplingSettings | None = None,
    reference_samples: list[list[Sample]] | None = None,
    progress: bool = True,
) -> tuple[dict, list[dict]]:
    """Sample from policy and reference on `prompts`, score with `reward`, compare.

    Returns (metrics, one record per prompt with both models' completions and rewards).
    `reference_samples` reuses completions already drawn from the reference for these prompts.
    """
    settings = settings or SamplingSettings(bf16=c.bf16)
    n, tok = samples_per_prompt, c.tokenizer
    pol = sample(c.model, tok, prompts, n, settings, progress, "policy samples")
    if reference_samples is None:
        with c.reference.module() as ref_model:
            reference_samples = sample(ref_model, tok, prompts, n, settings, progress, "reference samples")
    ref = [row[:n] for row in reference_samples]
    flat_prompts = [p for p in prompts for _ in range(n)]
    r_pol = torch.tensor(
        score_samples(reward, flat_prompts, [s.completion for row in pol for s in row], tok)
    ).view(len(prompts), n)
    r_ref = torch.tensor(
        score_samples(reward, flat_prompts, [s.completion for row in ref for s in row], tok)
    ).view(len(prompts), n)
    kl_seq = sampled_kl(c, pol)
    len_pol = torch.tensor([[len(s.completion_ids) for s in row] for row in pol], dtype=torch.float64)
    len_ref = torch.tensor([[len(s.completion_ids) for s in row] for row in ref], dtype=torch.float64)
    wins = (r_pol > r_ref).double() + 0.5 * (r_pol == r_ref).double()
    count = kl_seq.numel()
    metrics = {
        "prompts": len(prompts),
        "samples_per_prompt": n,
        "sampling": asdict(settings),
        "reward/policy": float(r_pol.mean()),
        "reward/reference": float(r_ref.mean()),
        "reward/gain": float(r_pol.mean() - r_ref.mean()),
        "reward/policy_stderr": _stderr(r_pol),
        "reward/reference_stderr": _stderr(r_ref),
        "win_rate": float(wins.mean()),
        "kl/sequence": float(kl_seq.mean()),
        "kl/sequence_stderr": _stderr(kl_seq),
        "kl/token": float(kl_seq.sum() / len_pol.sum()),
        **length_controlled(r_pol, r_ref, len_pol, len_ref),
        "length/policy": float(len_pol.mean()),
        "length/reference": float(len_ref.mean()),
        "length/drift": float(len_pol.mean() - len_ref.mean()),
        "finished/policy": sum(s.finished for row in pol for s in row) / count,
        "finished/reference": sum(s.finished for row in ref for s in row) / count,
    }
    records = [
        {
            "prompt": prompts[i],
            "policy": [s.completion for s in pol[i]],
            "reference": [s.completion for s in ref[i]],
            "reward_policy": r_pol[i].tolist(),
            "reward_reference": r_ref[i].tolist(),
            "kl_sequence": kl_seq[i].tolist(),
        }
        for i in range(len(prompts))
    ]
    return metrics, records


def sampled_kl(c: Trained, drawn: list[list[Sample]]) -> torch.Tensor:
    """(prompts, samples) float64 log pi(y|x) - log pi_ref(y|x) of completions drawn from the policy: their
    mean estimates KL(policy || reference) in nats per completion."""
    pad = c.tokenizer.pad_token_id
    lp_pol = sequence_logps(c.model, drawn, pad, bf16=c.bf16)
    with c.reference.module() as ref_model:
        lp_ref = sequence_logps(ref_model, drawn, pad, bf16=c.bf16)
    return (lp_pol - lp_ref).double()


def length_controlled(r_pol, r_ref, len_pol, len_ref) -> dict:
    """The reward gain with length taken out: the least-squares slope of reward on completion tokens over
    every sample of both models, and the gain minus what the length difference alone buys at that slope."""
    r = torch.cat([r_pol.flatten(), r_ref.flatten()]).double()
    n = torch.cat([len_pol.flatten(), len_ref.flatten()]).double()
    var = float(((n - n.mean()) ** 2).mean())
    slope = float(((n - n.mean()) * (r - r.mean())).mean()) / var if var > 0 else 0.0
    gain = float(r_pol.double().mean() - r_ref.double().mean())
    drift = float(len_pol.mean() - len_ref.mean())
    return {"reward/length_slope": slope, "reward/gain_length_controlled": gain - slope * drift}


def _stderr(values: torch.Tensor) -> float:
    v = values.double().flatten()
    return float(v.std(unbiased=True) / math.sqrt(v.numel())) if v.numel() > 1 else 0.0
