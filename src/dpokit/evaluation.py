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

import dataclasses
import json
import math
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from dpokit import models
from dpokit.batching import Layout
from dpokit.config import Config, LossConfig, load_config
from dpokit.data import DataError, load_examples, resolve_data_path
from dpokit.data.readers import read_records
from dpokit.errors import UsageError
from dpokit.generate import Sample, SamplingSettings, sample, sequence_logps
from dpokit.logps import CompletionLogps
from dpokit.metrics import PairMetrics, write_jsonl
from dpokit.objective import Objective
from dpokit.progress import Progress
from dpokit.reference import Reference, eval_mode
from dpokit.schedule import eval_batches
from dpokit.session import layout_for


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


@dataclass
class Compared:
    """A policy and its reference, as `dpokit eval` and the demo compare them."""

    policy: torch.nn.Module
    """A causal LM; PEFT-wrapped when it is a LoRA run's policy."""
    reference: Reference
    tokenizer: object
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    """The loss the policy was trained with (its beta scales the implicit reward)."""
    layout: Layout = dataclasses.field(default_factory=Layout)
    """The batch layout of the run (exact: every layout gives the same numbers)."""
    bf16: bool = False
    source: str = ""

    @classmethod
    def lora_run(cls, policy, tokenizer, cfg, source: str = "") -> Compared:
        """A LoRA policy against itself with its adapters off (the reference of its training)."""
        clp = CompletionLogps(policy, cfg.train.logps_chunk_size, cfg.train.bf16)
        return cls(
            policy,
            Reference.adapters_off(clp),
            tokenizer,
            cfg.loss,
            layout_for(cfg, policy),
            cfg.train.bf16,
            source,
        )


def run_checkpoint(run_dir: Path) -> Path:
    """The checkpoint a run ended with (summary.json), else its newest step-N folder."""
    from dpokit.checkpoint import latest_checkpoint

    summary = run_dir / "summary.json"
    if summary.is_file():
        ckpt = json.loads(summary.read_text()).get("checkpoint")
        if ckpt and Path(ckpt).is_dir():
            return Path(ckpt)
    found = latest_checkpoint(run_dir)
    if found is None:
        raise UsageError(
            f"{run_dir}: no checkpoint (checkpoints/step-N); was the run saved (train.save_final)?"
        )
    return found


def load_for_eval(
    target: str, ref: str | None = None, device: str | None = None, bf16: bool | None = None
) -> Compared:
    """A run dir (its final checkpoint against its config's model) or a model (against `ref`)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    path = Path(target)
    ref_model = None
    if ref is not None:
        ref_model = models.load_model(models.resolve_model_path(ref, "--ref"))
    if not (path / "config.yaml").is_file():
        resolved = models.resolve_model_path(target, "eval target")
        if ref_model is None:
            raise UsageError(
                f"{target!r} is a model, not a run dir (no config.yaml): give the model it was "
                "trained from with --ref MODEL"
            )
        policy = models.load_model(resolved).to(device).eval().requires_grad_(False)
        return Compared(
            policy,
            Reference.separate(ref_model.to(device), bf16=bool(bf16)),
            models.load_tokenizer(resolved),
            layout=layout_for(Config(), policy, ref_model),  # the default (fast, exact) layout
            bf16=bool(bf16),
            source=target,
        )
    cfg = load_config(str(path / "config.yaml"))
    if bf16 is not None:
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, bf16=bf16))
    ckpt = run_checkpoint(path)
    tokenizer = models.load_tokenizer(str(ckpt), cfg.model.trust_remote_code)
    source = f"{path} ({ckpt.name})"
    if ref_model is None:  # the run's own reference when it was not the start of its policy
        ref_model = models.load_reference_model(cfg, models.resolve_model_path(cfg.model.name))
    if cfg.lora.enabled:
        from peft import PeftModel

        base = models.load_run_base(cfg)
        with warnings.catch_warnings():  # peft calls a deprecated transformers name; nothing to act on
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            policy = PeftModel.from_pretrained(base, str(ckpt)).to(device).eval().requires_grad_(False)
        if ref_model is None:
            return Compared.lora_run(policy, tokenizer, cfg, source)
    else:
        policy = (
            models.load_model(str(ckpt), cfg.model.trust_remote_code).to(device).eval().requires_grad_(False)
        )
        if ref_model is None:
            ref_model = models.load_model(
                models.resolve_model_path(cfg.model.name), cfg.model.trust_remote_code
            )
    reference = Reference.separate(ref_model.to(device), cfg.train.logps_chunk_size, cfg.train.bf16)
    return Compared(
        policy, reference, tokenizer, cfg.loss, layout_for(cfg, policy, ref_model), cfg.train.bf16, source
    )


def load_prompts(spec: str, split: str | None = None, limit: int = 0, key: str = "--prompts") -> list:
    """Unique prompts of a file (any record with a `prompt` field: prompt files and preference files), in
    first-seen order; `builtin:reviews` is the demo's movie-review openings. `split` keeps records whose
    `split` field equals it."""
    path = resolve_data_path(spec, "prompts")
    if not path.exists():
        raise DataError(str(path), f"no such file (given as {key})")
    prompts, seen = [], set()
    for rec in read_records(path):
        if isinstance(rec, DataError):
            raise rec
        value = rec.value
        if not isinstance(value, dict) or "prompt" not in value:
            raise DataError(
                rec.where, "missing (every record needs a prompt: text or a list of chat messages)", "prompt"
            )
        prompt = value["prompt"]
        if not (isinstance(prompt, str) and prompt.strip()) and not (isinstance(prompt, list) and prompt):
            raise DataError(
                rec.where, "must be non-empty text or a non-empty list of chat messages", "prompt"
            )
        if split is not None and value.get("split") != split:
            continue
        key_ = json.dumps(prompt, sort_keys=True)
        if key_ not in seen:
            seen.add(key_)
            prompts.append(prompt)
        if limit and len(prompts) == limit:
            break
    if not prompts:
        raise DataError(str(path), "no prompts" + (f" with split={split!r}" if split else ""))
    return prompts


def preference_metrics(
    c: Compared, data: str, max_length: int = 1024, max_prompt_length: int = 512, batch_size: int = 8
) -> dict:
    """Accuracy, margins, log-ratios and per-token KL of the chosen completions on a preference file."""
    from dpokit.tokenize import tokenize_pairs

    examples, _ = load_examples(data, key="--data")
    pairs, stats = tokenize_pairs(examples, c.tokenizer, max_length, max_prompt_length)
    if not pairs:
        raise DataError(data, f"no pairs left after tokenization ({stats.to_dict()['dropped']})")
    policy = CompletionLogps(c.policy, bf16=c.bf16)
    device = next(c.policy.parameters()).device
    pad = c.tokenizer.pad_token_id

    def collate(indices):
        return c.layout.pairs([pairs[i] for i in indices], pad, ids=indices).to(device)

    metrics, _ = evaluate_pairs(policy, c.reference, Objective(c.loss), pairs, collate, batch_size=batch_size)
    return {**metrics, "pairs": len(pairs), "dropped": dict(stats.dropped)}


def generation_metrics(
    c: Compared,
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
    pol = sample(c.policy, tok, prompts, n, settings, progress, "policy samples")
    if reference_samples is None:
        with c.reference.module() as ref_model:
            reference_samples = sample(ref_model, tok, prompts, n, settings, progress, "reference samples")
    ref = [row[:n] for row in reference_samples]
    flat_prompts = [
        p if isinstance(p, str) else tok.apply_chat_template(p, tokenize=False)
        for p in prompts
        for _ in range(n)
    ]
    r_pol = torch.tensor(reward(flat_prompts, [s.completion for row in pol for s in row])).view(
        len(prompts), n
    )
    r_ref = torch.tensor(reward(flat_prompts, [s.completion for row in ref for s in row])).view(
        len(prompts), n
    )
    pad = tok.pad_token_id
    lp_pol = sequence_logps(c.policy, pol, pad, bf16=c.bf16)
    with c.reference.module() as ref_model:
        lp_ref = sequence_logps(ref_model, pol, pad, bf16=c.bf16)
    kl_seq = (lp_pol - lp_ref).double()
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


def _stderr(values: torch.Tensor) -> float:
    v = values.double().flatten()
    return float(v.std(unbiased=True) / math.sqrt(v.numel())) if v.numel() > 1 else 0.0


def write_results(out_dir: Path, results: dict, records: list[dict] | None) -> Path:
    """RUN_DIR/eval.json (+ eval_samples.jsonl): what `dpokit report` shows."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "eval.json"
    path.write_text(json.dumps(results, indent=2, default=str))
    if records is not None:
        write_jsonl(out_dir / "eval_samples.jsonl", records)
    return path


def run_eval(
    target: str,
    *,
    data: str | None = None,
    prompts: str | None = None,
    split: str | None = None,
    reward: str | None = None,
    ref: str | None = None,
    num_prompts: int = 64,
    samples: int = 2,
    sampling: SamplingSettings | None = None,
    bf16: bool | None = None,
    max_length: int = 1024,
    max_prompt_length: int = 512,
    batch_size: int = 32,
    out: str | None = None,
) -> tuple[dict, Path]:
    """`dpokit eval`: preference metrics on `data` and/or generation metrics with `reward` on `prompts` (or
    the prompts of `data`); writes eval.json (+ eval_samples.jsonl) to `out`, the run dir, or ./eval-<time>.
    Every option is checked before a model is loaded."""
    from datetime import datetime

    from dpokit.rewards import get_reward

    if not data and not reward:
        raise UsageError("nothing to evaluate: give --data (preference pairs) and/or --reward (with prompts)")
    if reward and not (prompts or data):
        raise UsageError("--reward needs prompts: give --prompts FILE (or --data)")
    scorer = get_reward(reward) if reward else None
    prompt_list = (
        load_prompts(prompts or data, split, num_prompts, "--prompts" if prompts else "--data")
        if scorer
        else None
    )
    if data and not resolve_data_path(data).exists():
        raise DataError(data, "no such file (given as --data)")
    c = load_for_eval(target, ref, bf16=bf16)
    results: dict = {"target": c.source, "reference": ref or "the run's starting model"}
    records = None
    if data:
        results["preference"] = preference_metrics(c, data, max_length, max_prompt_length, batch_size)
        results["data"] = data
    if scorer is not None:
        settings = dataclasses.replace(sampling or SamplingSettings(), bf16=c.bf16)
        results["generation"], records = generation_metrics(c, prompt_list, scorer, samples, settings)
        results["reward"] = reward
    is_run = (Path(target) / "config.yaml").is_file()
    folder = (
        Path(out) if out else Path(target) if is_run else Path(datetime.now().strftime("eval-%Y%m%d-%H%M%S"))
    )
    return results, write_results(folder, results, records)
