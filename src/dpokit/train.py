"""The training loop: one explicit function, read top to bottom.

    pairs -> micro-batches -> reference logps (no_grad) + policy logps -> loss -> backward (accumulate)
          -> clip -> AdamW step -> lr schedule -> metrics.jsonl -> eval / checkpoint
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dpokit import models
from dpokit.backends import apply_matmul_backend, use_low_memory_allocator
from dpokit.batching import Layout
from dpokit.checkpoint import latest_checkpoint, load_model_weights, load_training_state, save_checkpoint
from dpokit.config import Config
from dpokit.data import load_examples, split_by_prompt
from dpokit.data.filters import filter_pairs
from dpokit.errors import TrainingError
from dpokit.guards import Guards
from dpokit.logps import CompletionLogps
from dpokit.metrics import MetricsWriter, PairMetrics, StepReporter, read_metrics, write_jsonl
from dpokit.objective import Objective, ld_token_weights
from dpokit.optim import build_optimizer, build_scheduler
from dpokit.reference import (
    CachedReference,
    FrozenCopyReference,
    PolicyReference,
    cache_key,
    eval_mode,
    load_or_compute,
    precompute_table,
    unwrap,
    weights_fingerprint,
)
from dpokit.rundir import is_main_process, prepare_run_dir, write_summary
from dpokit.tokenize import tokenize_pairs, tokenize_unpaired

__all__ = ["RunResult", "TrainingError", "apply_matmul_backend", "precompute_reference", "train"]

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    run_dir: Path
    history: list[dict]
    initial_eval: dict | None
    final_eval: dict | None
    checkpoint: Path | None
    model: torch.nn.Module | None = None
    """The trained model (PEFT-wrapped for LoRA), unwrapped from Accelerate."""
    stopped: str = "completed all steps"
    """Why the run ended (also in summary.json)."""


@dataclass
class Session:
    """Everything the loop needs, built once from the config."""

    cfg: Config
    accelerator: object
    tokenizer: object
    objective: Objective
    policy: torch.nn.Module
    train_examples: list
    eval_examples: list
    collate: object
    pad_id: int
    weights_key: str | None = None
    """Fingerprint of the reference weights, computed once (keys the reference cache)."""
    ref_cache_paths: list[Path] = field(default_factory=list)
    """Where make_references read or wrote the cached reference log-probs (train, eval)."""


def setup(cfg: Config, run_dir: Path | None, trackers: list | None = None) -> Session:
    """Seed, devices, tokenizer, data, model (+ LoRA), the wrapped policy; `run_dir` gets data_stats.json.

    `trackers`: Accelerate tracker objects (GeneralTracker) that receive the metrics, besides the ones
    named in train.report_to."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    set_seed(cfg.train.seed)
    apply_matmul_backend(cfg.train.fast_fp32_matmul)
    if cfg.train.low_memory_allocator:
        use_low_memory_allocator()
    # bf16 is autocast inside CompletionLogps (fp32 master weights), not through Accelerate's process-wide
    # mixed-precision state, which cannot change between two runs in one Python process.
    sinks = [*cfg.train.report_to, *(trackers or [])]
    accelerator = Accelerator(
        cpu=cfg.train.device == "cpu", log_with=sinks or None, project_dir=str(run_dir) if run_dir else None
    )
    objective = Objective(cfg.loss, _mean_reduce(accelerator))
    model_path = models.resolve_model_path(cfg.model.name)
    tokenizer = models.load_tokenizer(model_path, cfg.model.trust_remote_code)
    train_examples, eval_examples = prepare_data(cfg, tokenizer, run_dir, objective.unpaired)
    model = models.load_model(model_path, cfg.model.trust_remote_code, cfg.model.attn_implementation)
    if cfg.train.gradient_checkpointing:
        models.enable_activation_checkpointing(model)
    if cfg.lora.enabled:
        lc = cfg.lora
        model = models.add_lora(model, lc.r, lc.alpha, lc.dropout, lc.target_modules)
    layout = Layout(cfg.train.prefix_sharing, cfg.train.packing, cfg.train.pack_tokens)
    collate = functools.partial(layout.unpaired, max_length=cfg.data.max_length) if objective.unpaired else layout.pairs
    policy = CompletionLogps(model, cfg.train.logps_chunk_size, bf16=cfg.train.bf16)
    return Session(
        cfg, accelerator, tokenizer, objective, policy, train_examples, eval_examples, collate, tokenizer.pad_token_id
    )


def train(cfg: Config, trackers: list | None = None) -> RunResult:
    """Train the policy described by `cfg` and return where everything was written.

    Metrics go to RUN_DIR/metrics.jsonl, and live to the Accelerate trackers of train.report_to and
    `trackers` (GeneralTracker objects)."""
    started = time.perf_counter()
    run_dir = prepare_run_dir(cfg)
    s = setup(cfg, run_dir, trackers)
    accelerator, objective, collate, pad_id = s.accelerator, s.objective, s.collate, s.pad_id
    eval_pairs = s.eval_examples
    optimizer = build_optimizer(s.policy.parameters(), cfg.train)
    schedule = list(step_schedule(len(s.train_examples), cfg.train, accelerator.num_processes))
    scheduler = build_scheduler(optimizer, cfg.train, len(schedule))
    policy, optimizer = accelerator.prepare(s.policy, optimizer)
    # from_pretrained returns eval mode: without this, LoRA dropout and activation checkpointing stay off.
    policy.train()
    # Built before any update (and before a resumed run loads its weights), so every strategy sees
    # exactly the starting policy.
    train_ref, eval_ref = make_references(s, policy)
    steps_per_epoch = epoch_steps(len(s.train_examples), cfg.train, accelerator.num_processes)
    t, e = cfg.train, cfg.eval
    guards = Guards(t.drift_warn, t.flat_window, t.flat_min_delta, e.patience, e.min_delta)
    start_step, history, initial_eval = 0, [], None
    if t.resume:
        start_step, history, initial_eval = resume_from(run_dir, s, policy, optimizer, scheduler, guards)

    def run_eval(step: int) -> dict:
        if not eval_pairs:
            return {}
        samples: list[dict] = []
        metrics = evaluate(policy, eval_ref, objective, eval_pairs, collate, pad_id, cfg, accelerator, samples)
        if samples and accelerator.is_main_process:
            for row in samples:
                pair = eval_pairs[row["index"]]
                row.update({k: s.tokenizer.decode(getattr(pair, f"{k}_ids")) for k in ("prompt", "chosen", "rejected")})
            with open(run_dir / "pair_samples.jsonl", "a", encoding="utf-8") as fh:
                fh.write(json.dumps({"step": step, "pairs": samples}) + "\n")
        return metrics

    def save(step: int, name: str | None = None) -> Path | None:
        if not accelerator.is_main_process:
            return None
        state = None
        if name is None:  # step checkpoints are resumable
            state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "torch_rng": torch.get_rng_state()}
        extra = {"guards": guards.state_dict(), "objective": objective.state_dict()}
        model = accelerator.unwrap_model(policy).model
        return save_checkpoint(model, s.tokenizer, run_dir, step, extra=extra, name=name, training_state=state)

    live = bool(cfg.train.report_to or trackers)
    if live:
        accelerator.init_trackers(run_dir.name, config=flat_config(cfg))
    writer = MetricsWriter(run_dir / "metrics.jsonl" if accelerator.is_main_process else None, accelerator if live else None)
    reporter = StepReporter(len(schedule), enabled=t.progress and accelerator.is_main_process, done=start_step)
    ckpt = None
    if e.at_start and eval_pairs and not t.resume:
        initial_eval = run_eval(0)
        writer.write({"step": 0, "epoch": 0.0, **initial_eval})
        reporter.print_eval(0, initial_eval)
    with reporter:
        for step, micro_batches in enumerate(schedule, start=1):
            if step <= start_step:  # a resumed run replays nothing: the data order is a function of the step
                continue
            t0 = time.perf_counter()
            lr = scheduler.get_last_lr()[0]
            sums, tokens = accumulate_gradients(s, policy, train_ref, micro_batches)
            grad_norm = float(accelerator.clip_grad_norm_(policy.parameters(), t.max_grad_norm or math.inf))
            record = {"step": step, "epoch": step / steps_per_epoch, **sums.compute(accelerator)}
            if not (math.isfinite(record["loss"]) and math.isfinite(grad_norm)):
                # the update is not applied: the weights are still those of the last good step
                last_good = save(step - 1, name=f"step-{step - 1}-last-good")
                reason = non_finite_message(record["loss"], grad_norm, step, cfg, last_good)
                write_summary(run_dir, history, initial_eval, None, last_good, time.perf_counter() - started, reason)
                raise TrainingError(reason)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            elapsed = time.perf_counter() - t0
            record.update(lr=lr, grad_norm=grad_norm, tokens_per_s=tokens / elapsed, step_time_s=elapsed)
            guards.on_step(record, cfg.loss.beta, lr)
            if ((e.every and step % e.every == 0) or step == len(schedule)) and eval_pairs:
                record.update(run_eval(step))
                reporter.print_eval(step, record)
                if guards.on_eval(record) and e.patience:
                    save(step, name="best")
            writer.write(record)
            history.append(record)
            reporter.update(record)
            if guards.stop_reason:
                break
            if t.checkpoint_every and step % t.checkpoint_every == 0 and step < len(schedule):
                save(step)
    writer.close()
    if live:
        accelerator.end_training()
    final_eval = {k: v for k, v in history[-1].items() if k.startswith("eval/")} or None
    if t.save_final:
        ckpt = save(len(history))
    stopped = guards.stop_reason or "completed all steps"
    if accelerator.is_main_process:
        write_summary(run_dir, history, initial_eval, final_eval, ckpt, time.perf_counter() - started, stopped, guards)
    return RunResult(run_dir, history, initial_eval, final_eval, ckpt, accelerator.unwrap_model(policy).model, stopped)


def resume_from(run_dir: Path, s: Session, policy, optimizer, scheduler, guards: Guards):
    """Load the latest resumable checkpoint of `run_dir`; returns (its step, metrics so far, initial eval)."""
    folder = latest_checkpoint(run_dir)
    if folder is None:
        raise TrainingError(
            f"train.resume=true but {run_dir}/checkpoints holds no resumable checkpoint (step-N with "
            "training_state.pt); set train.checkpoint_every to write them, or start without train.resume"
        )
    state, info = load_training_state(folder)
    load_model_weights(unwrap(policy).model, folder, lora=s.cfg.lora.enabled)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    guards.load_state_dict(info["guards"])
    s.objective.load_state_dict(info["objective"])
    step = info["step"]
    for name in ("metrics.jsonl", "pair_samples.jsonl"):  # forget what was logged after the checkpoint
        kept = [r for r in read_metrics(run_dir / name) if r["step"] <= step] if (run_dir / name).exists() else []
        write_jsonl(run_dir / name, kept)
    records = read_metrics(run_dir / "metrics.jsonl")
    initial = next((r for r in records if r["step"] == 0), None)
    log.info("resumed from %s (step %d)", folder, step)
    history = [r for r in records if r["step"] > 0]
    return step, history, ({k: v for k, v in initial.items() if k.startswith("eval/")} if initial else None)


def accumulate_gradients(s: Session, policy, reference, micro_batches: list[list[int]]) -> tuple[PairMetrics, int]:
    """Forward + backward over this process's micro-batches of one optimizer step; returns their metric
    sums and tokens. The loss is the sum over the step's pairs divided by the step's pairs (all processes),
    times the process count because DDP averages gradients: batch 4 x accum 1 == batch 1 x accum 4 ==
    2 processes x batch 2."""
    acc = s.accelerator
    sums, tokens = PairMetrics(), 0
    step_pairs = sum(len(m) for m in micro_batches)
    mine = micro_batches[acc.process_index :: acc.num_processes]
    for i, indices in enumerate(mine):
        batch = to_device(s.collate([s.train_examples[j] for j in indices], s.pad_id, ids=indices), acc.device)
        main = batch[0] if isinstance(batch, tuple) else batch
        last = i == len(mine) - 1
        with contextlib.nullcontext() if last else acc.no_sync(policy):
            out, extras = s.objective(policy, reference, batch)
            acc.backward((out.losses * main.weights).sum() * acc.num_processes / step_pairs)
        sums.add(out, extras)
        tokens += main.num_tokens
    return sums, tokens


def precompute_reference(cfg: Config) -> list[Path]:
    """`dpokit precompute-ref`: fill the on-disk reference cache for the train and eval splits."""
    cfg.train.precompute_ref = True
    s = setup(cfg, None)
    policy = s.accelerator.prepare(s.policy)
    make_references(s, policy)
    return s.ref_cache_paths


def make_references(s: Session, policy):
    """(train reference, eval reference): None for reference-free losses (nothing is built or run)."""
    cfg = s.cfg
    if not s.objective.needs_reference:
        return None, None
    if not cfg.train.precompute_ref:
        ref = PolicyReference(policy) if cfg.lora.enabled else FrozenCopyReference(policy)
        return ref, ref
    initial = PolicyReference(policy, adapters_off=cfg.lora.enabled)
    token_weights = (lambda b: ld_token_weights(b, cfg.loss.ld_alpha)) if cfg.loss.ld_alpha != 1.0 else None
    refs = []
    for name, examples in (("train", s.train_examples), ("eval", s.eval_examples)):
        path = ref_cache_path(s, policy, examples)
        s.ref_cache_paths.append(path)
        table, reused = load_or_compute(
            path,
            lambda ex=examples: precompute_table(
                initial, ex, s.collate, s.pad_id, cfg.eval.batch_size, s.accelerator.device, token_weights
            ),
        )
        log.info("reference log-probs (%s, %d pairs): %s %s", name, len(examples), "reused" if reused else "computed", path)
        refs.append(CachedReference(table))
    return tuple(refs)


def ref_cache_path(s: Session, policy, examples: list) -> Path:
    cfg = s.cfg
    settings = {
        "ld_alpha": cfg.loss.ld_alpha,
        "bf16": cfg.train.bf16,
        "attn": cfg.model.attn_implementation,
        "fast_fp32_matmul": cfg.train.fast_fp32_matmul,
    }
    if s.weights_key is None:
        s.weights_key = weights_fingerprint(unwrap(policy).model)
    root = Path(cfg.train.ref_cache_dir) if cfg.train.ref_cache_dir else models.cache_dir() / "ref-logps"
    return root / f"{cache_key(s.weights_key, examples, settings)}.safetensors"


@torch.no_grad()
def evaluate(
    policy, reference, objective: Objective, examples: list, collate, pad_id: int, cfg: Config, accelerator, samples: list | None = None
) -> dict:
    """Held-out metrics (`eval/` keys), dropout off, averaged over every example.

    `samples`, when given, receives the per-pair values (log-ratios, rewards, loss) of the first
    `eval.sample_pairs` pairs (paired losses; all of them lie in batch 0, which process 0 runs)."""
    sums = PairMetrics()
    size, rank, world = cfg.eval.batch_size, accelerator.process_index, accelerator.num_processes
    n_batches = math.ceil(len(examples) / size)
    with eval_mode(policy):
        # Process r takes batches r, r + world, ...; every process runs the same number of forwards, because
        # a DDP forward is a collective (it broadcasts buffers) even under no_grad. A process out of batches
        # recomputes batch 0 and drops the result.
        for b in range(rank, math.ceil(n_batches / world) * world, world):
            start = (b if b < n_batches else 0) * size
            stop = min(start + size, len(examples))
            batch = to_device(collate(examples[start:stop], pad_id, ids=list(range(start, stop))), accelerator.device)
            out, extras = objective(policy, reference, batch)
            if b < n_batches:
                sums.add(out, extras)
            if b == 0 and samples is not None and not objective.unpaired:
                samples += pair_samples(out, extras, min(cfg.eval.sample_pairs, stop - start))
    return sums.compute(accelerator, prefix="eval/")


def pair_samples(out, extras: dict, k: int) -> list[dict]:
    """Per-pair values of the first `k` pairs of a batch (the log-ratio picture of `dpokit report`)."""
    rows = []
    for i in range(k):
        row = {"index": i, "loss": float(out.losses[i]), "reward_chosen": float(out.chosen_rewards[i]),
               "reward_rejected": float(out.rejected_rewards[i])}
        for key in ("logratio/chosen", "logratio/rejected", "logps/chosen", "logps/rejected"):
            if key in extras:
                row[key.replace("/", "_")] = float(extras[key][i])
        rows.append(row)
    return rows


def to_device(batch, device):
    return tuple(b.to(device) for b in batch) if isinstance(batch, tuple) else batch.to(device)


def epoch_micro_batches(num_pairs: int, tc, world: int) -> int:
    """Micro-batches used per epoch: all of them with one process; a multiple of `world` with several."""
    n = math.ceil(num_pairs / tc.batch_size)
    return n - n % world if world > 1 else n


def epoch_steps(num_pairs: int, tc, world: int = 1) -> int:
    return math.ceil(epoch_micro_batches(num_pairs, tc, world) / (tc.grad_accum * world))


def step_schedule(num_pairs: int, tc, world: int = 1) -> Iterator[list[list[int]]]:
    """Pair indices of every optimizer step, for all processes: grad_accum x world micro-batches of
    batch_size pairs; process r takes micro-batches r, r + world, ... (see accumulate_gradients).

    Each epoch is a fresh seeded permutation; a step never spans two epochs. With one process the last
    step of an epoch may be short; with several, an epoch's micro-batches that cannot give every process
    one are left out, so no process waits on a collective the others never reach.
    """
    per_step = tc.grad_accum * world
    total = tc.max_steps or math.ceil(tc.epochs * epoch_steps(num_pairs, tc, world))
    emitted, epoch = 0, 0
    while emitted < total:
        order = torch.randperm(num_pairs, generator=torch.Generator().manual_seed(tc.seed + epoch)).tolist()
        micro = [order[i : i + tc.batch_size] for i in range(0, num_pairs, tc.batch_size)]
        micro = micro[: epoch_micro_batches(num_pairs, tc, world)]
        for i in range(0, len(micro), per_step):
            if emitted == total:
                return
            yield micro[i : i + per_step]
            emitted += 1
        epoch += 1


def prepare_data(cfg: Config, tokenizer, run_dir: Path | None, unpaired: bool = False) -> tuple[list, list]:
    """Load, split and tokenize (pairs, or unpaired examples for KTO); every skip and drop is counted in
    RUN_DIR/data_stats.json."""
    d = cfg.data
    examples, load_stats = load_examples(d.train, d.skip_invalid, unpaired)
    if d.limit:
        examples = examples[: d.limit]
    stats = {"train_file": load_stats.to_dict()}
    if d.eval:
        eval_examples, eval_stats = load_examples(d.eval, d.skip_invalid, unpaired)
        stats["eval_file"] = eval_stats.to_dict()
    else:
        examples, eval_examples = split_by_prompt(examples, d.eval_fraction, cfg.train.seed)
    if not unpaired:
        filtered = {}
        for name, exs in (("train", examples), ("eval", eval_examples)):
            kept, dropped = filter_pairs(
                exs,
                drop_identical=d.drop_identical,
                max_similarity=d.max_similarity,
                min_agreement=d.min_agreement,
                min_score_gap=d.min_score_gap,
                min_confidence=d.min_confidence,
                rebalance_length=d.rebalance_length and name == "train",
                tokenizer=tokenizer,
                seed=cfg.train.seed,
            )
            filtered[name] = dict(dropped)
            if dropped:
                log.warning("%s: filtered out %d pairs (%s)", name, sum(dropped.values()), dict(dropped))
            if name == "train":
                examples = kept
            else:
                eval_examples = kept
        stats["filtered"] = filtered
    tokenize = tokenize_unpaired if unpaired else tokenize_pairs
    train_pairs, tstats = tokenize(examples, tokenizer, d.max_length, d.max_prompt_length, d.skip_invalid)
    eval_pairs, estats = tokenize(eval_examples, tokenizer, d.max_length, d.max_prompt_length, d.skip_invalid)
    stats.update(train_tokenized=tstats.to_dict(), eval_tokenized=estats.to_dict())
    if run_dir is not None and is_main_process():
        (run_dir / "data_stats.json").write_text(json.dumps(stats, indent=2))
    for name, s in (("train", tstats), ("eval", estats)):
        if s.dropped:
            log.warning("%s: dropped %s pairs (%s)", name, sum(s.dropped.values()), dict(s.dropped))
    if not train_pairs:
        raise TrainingError("no training pairs left after tokenization and truncation; see data_stats.json")
    log.info("data: %d train pairs, %d eval pairs", len(train_pairs), len(eval_pairs))
    return train_pairs, eval_pairs


def non_finite_message(loss: float, grad_norm: float, step: int, cfg: Config, last_good: Path | None) -> str:
    kept = f"the last good weights (after step {step - 1}) are in {last_good}" if last_good else "nothing was saved"
    return (
        f"stopped at step {step}: loss={loss}, grad_norm={grad_norm} is not finite, so the update was not applied; "
        f"{kept}. Likely causes: train.lr={cfg.train.lr} too high, loss.beta={cfg.loss.beta} too high for the "
        "log-prob scale, an empty or fully truncated completion, or bf16 overflow. Fix: lower train.lr, lower "
        "loss.beta, check the data with `dpokit data check`, or set train.bf16=false."
    )


def flat_config(cfg: Config) -> dict:
    """The config as `section.key: value` scalars (lists as strings), which every tracker accepts."""
    from dataclasses import asdict

    return {f"{sec}.{k}": (v if isinstance(v, (int, float, str, bool)) else str(v)) for sec, d in asdict(cfg).items() for k, v in d.items()}


def _mean_reduce(accelerator):
    if accelerator.num_processes == 1:
        return None
    return lambda t: accelerator.reduce(t.to(accelerator.device), reduction="mean")
