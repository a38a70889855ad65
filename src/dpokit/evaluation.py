"""`dpokit eval`: did training improve the model, and at what distance from the reference?

Two kinds of evidence, both against the reference pi_ref (the starting model):

- preference data (`--data`): held-out accuracy and margins of the implicit reward, the mean log-ratio
  log pi/pi_ref of chosen and rejected completions, and a per-token KL estimate on the chosen ones;
- generation (`--prompts` or the prompts of `--data`, with `--reward`): sample completions from the policy
  and from the reference, score both, and report mean reward, the policy's win rate over the reference,
  the sampled KL(pi || pi_ref) per sequence and per token, and the length drift.

The sampled KL is sum_t [log pi(y_t | .) - log pi_ref(y_t | .)] over completions y ~ pi, averaged: an
unbiased estimate of the sequence-level KL when sampling at temperature 1 without top-p (the default);
with other sampling settings it is the same statistic, not the KL of the sampling distribution.
"""

from __future__ import annotations

import contextlib
import json
import math
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from dpokit import models
from dpokit.config import Config, LossConfig, load_config
from dpokit.data import DataError, load_examples, resolve_data_path
from dpokit.data.readers import read_records
from dpokit.generate import Sample, SamplingSettings, adapters_disabled, sample, sequence_logps
from dpokit.metrics import write_jsonl


@dataclass
class PolicyAndReference:
    policy: torch.nn.Module
    """A causal LM; PEFT-wrapped when it is a LoRA run's policy."""
    tokenizer: object
    reference: torch.nn.Module | None = None
    """A separate reference model, or None: the policy with its LoRA adapters switched off."""
    loss: LossConfig | None = None
    """The loss the policy was trained with (its beta scales the implicit reward)."""
    bf16: bool = False
    source: str = ""

    def reference_context(self):
        return contextlib.nullcontext() if self.reference is not None else adapters_disabled(self.policy)

    @property
    def reference_model(self) -> torch.nn.Module:
        return self.reference if self.reference is not None else self.policy


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
        raise FileNotFoundError(f"{run_dir}: no checkpoint (checkpoints/step-N); was the run saved (train.save_final)?")
    return found


def load_for_eval(target: str, ref: str | None = None, device: str | None = None, bf16: bool | None = None) -> PolicyAndReference:
    """A run dir (its final checkpoint vs its config's model) or a model (vs `ref`)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    path = Path(target)
    if (path / "config.yaml").is_file():
        cfg = load_config(str(path / "config.yaml"))
        ckpt = run_checkpoint(path)
        tokenizer = models.load_tokenizer(str(ckpt), cfg.model.trust_remote_code)
        if cfg.lora.enabled:
            from peft import PeftModel

            base = models.load_model(models.resolve_model_path(cfg.model.name), cfg.model.trust_remote_code)
            with warnings.catch_warnings():  # peft calls a deprecated transformers name; nothing to act on
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
                policy = PeftModel.from_pretrained(base, str(ckpt))
        else:
            policy = models.load_model(str(ckpt), cfg.model.trust_remote_code)
        reference = None
        if ref is not None or not cfg.lora.enabled:
            reference = models.load_model(models.resolve_model_path(ref or cfg.model.name), cfg.model.trust_remote_code)
        use_bf16 = cfg.train.bf16 if bf16 is None else bf16
        pr = PolicyAndReference(policy, tokenizer, reference, cfg.loss, use_bf16, f"{path} ({ckpt.name})")
    else:
        if ref is None:
            raise FileNotFoundError(
                f"{target!r} is not a run dir (no config.yaml): give the reference with --ref MODEL "
                "(the model the policy was trained from)"
            )
        resolved = models.resolve_model_path(target)
        tokenizer = models.load_tokenizer(resolved)
        pr = PolicyAndReference(
            models.load_model(resolved), tokenizer, models.load_model(models.resolve_model_path(ref)), LossConfig(), bool(bf16), target
        )
    for m in (pr.policy, pr.reference):
        if m is not None:
            m.to(device).eval().requires_grad_(False)
    return pr


def load_prompts(spec: str, split: str | None = None, limit: int = 0) -> list:
    """Unique prompts of a file (any record with a `prompt` field: prompt files and preference files), in
    first-seen order; `builtin:reviews` is the demo's movie-review openings. `split` keeps records whose
    `split` field equals it."""
    path = resolve_data_path(spec, "prompts")
    prompts, seen = [], set()
    for rec in read_records(path):
        if isinstance(rec, DataError):
            raise rec
        value = rec.value
        if not isinstance(value, dict) or "prompt" not in value:
            raise DataError(rec.where, "missing (every record needs a prompt: text or a list of chat messages)", "prompt")
        prompt = value["prompt"]
        if not (isinstance(prompt, str) and prompt.strip()) and not (isinstance(prompt, list) and prompt):
            raise DataError(rec.where, "must be non-empty text or a non-empty list of chat messages", "prompt")
        if split is not None and value.get("split") != split:
            continue
        key = json.dumps(prompt, sort_keys=True)
        if key not in seen:
            seen.add(key)
            prompts.append(prompt)
        if limit and len(prompts) == limit:
            break
    if not prompts:
        raise DataError(str(path), "no prompts" + (f" with split={split!r}" if split else ""))
    return prompts


@torch.no_grad()
def preference_metrics(pr: PolicyAndReference, data: str, max_length: int = 1024, max_prompt_length: int = 512, batch_size: int = 8) -> dict:
    """Accuracy, margins, log-ratios and per-token KL of the chosen completions on a preference file."""
    from dpokit.batching import Layout
    from dpokit.logps import CompletionLogps
    from dpokit.objective import Objective
    from dpokit.reference import ModelReference, PolicyReference
    from dpokit.tokenize import tokenize_pairs
    from dpokit.train import evaluate

    examples, _ = load_examples(data)
    pairs, stats = tokenize_pairs(examples, pr.tokenizer, max_length, max_prompt_length)
    if not pairs:
        raise DataError(data, f"no pairs left after tokenization ({stats.to_dict()['dropped']})")
    policy = CompletionLogps(pr.policy, bf16=pr.bf16)
    reference = (
        ModelReference(CompletionLogps(pr.reference, bf16=pr.bf16)) if pr.reference is not None else PolicyReference(policy)
    )
    cfg = Config()
    cfg.loss = pr.loss or LossConfig()
    cfg.eval.batch_size = batch_size
    device = next(pr.policy.parameters()).device
    shim = _SingleProcess(device)
    objective = Objective(cfg.loss)
    metrics = evaluate(policy, reference, objective, pairs, Layout().pairs, pr.tokenizer.pad_token_id, cfg, shim)
    metrics = {k.removeprefix("eval/"): v for k, v in metrics.items()}
    metrics["pairs"] = len(pairs)
    metrics["dropped"] = dict(stats.dropped)
    return metrics


class _SingleProcess:
    """What `train.evaluate` asks of an Accelerator, for one process."""

    process_index, num_processes = 0, 1

    def __init__(self, device):
        self.device = device


def generation_metrics(
    pr: PolicyAndReference,
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
    settings = settings or SamplingSettings(bf16=pr.bf16)
    n, tok = samples_per_prompt, pr.tokenizer
    pol = sample(pr.policy, tok, prompts, n, settings, progress, "policy samples")
    if reference_samples is None:
        with pr.reference_context():
            reference_samples = sample(pr.reference_model, tok, prompts, n, settings, progress, "reference samples")
    ref = [row[:n] for row in reference_samples]
    flat_prompts = [p if isinstance(p, str) else tok.apply_chat_template(p, tokenize=False) for p in prompts for _ in range(n)]
    r_pol = torch.tensor(reward(flat_prompts, [s.completion for row in pol for s in row])).view(len(prompts), n)
    r_ref = torch.tensor(reward(flat_prompts, [s.completion for row in ref for s in row])).view(len(prompts), n)
    pad = tok.pad_token_id
    lp_pol = sequence_logps(pr.policy, pol, pad, bf16=pr.bf16)
    with pr.reference_context():
        lp_ref = sequence_logps(pr.reference_model, pol, pad, bf16=pr.bf16)
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
