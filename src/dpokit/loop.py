"""The training loop: one explicit function, read top to bottom.

    pairs -> micro-batches -> reference logps (no_grad) + policy logps -> loss -> backward (accumulate)
          -> clip -> AdamW step -> lr schedule -> one metrics record -> callbacks -> eval / checkpoint

Everything before the loop is built elsewhere: the session (data, model, objective: session.py), the
reference (reference.py), the step schedule (schedule.py), evaluation (evaluation.py), the run directory
(rundir.py) and checkpoints (checkpoint.py). The public entry is `dpokit.train` (api.py).
"""

from __future__ import annotations

import contextlib
import logging
import math
import resource
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from dpokit import reference as references
from dpokit import sharding
from dpokit.checkpoint import Saver, restore, resume_point
from dpokit.config import Config
from dpokit.errors import Interrupted, TrainingError
from dpokit.evaluation import eval_batches, evaluate_pairs
from dpokit.guards import Guards
from dpokit.metrics import PairMetrics
from dpokit.objective import ld_token_weights
from dpokit.optim import build_optimizer, build_scheduler
from dpokit.progress import StepReporter
from dpokit.reference import unwrap
from dpokit.rundir import Run, with_run_dir
from dpokit.schedule import epoch_steps, mine, step_schedule
from dpokit.session import Session, fit_deepspeed, setup
from dpokit.stopping import StopSignals

__all__ = ["RunResult", "precompute_reference", "train"]

log = logging.getLogger(__name__)
Callback = Callable[[dict], object]
"""Called with each optimizer step's metrics record; a truthy return stops the run after that step."""


@dataclass
class RunResult:
    run: Run
    history: list[dict]
    initial_eval: dict | None
    final_eval: dict | None
    checkpoint: Path | None
    model: torch.nn.Module | None = None
    """The trained model (PEFT-wrapped for LoRA), unwrapped from Accelerate."""
    stopped: str = "completed all steps"
    """Why the run ended (also in the run's summary)."""
    already_complete: bool = False
    """A resume found the run finished: nothing was run or written."""

    @property
    def run_dir(self) -> Path:
        return self.run.path


def train(
    cfg: Config,
    trackers: list | None = None,
    callbacks: Sequence[Callback] = (),
    given: dict | None = None,
    expected_reference: str | None = None,
) -> RunResult:
    """Train the policy described by `cfg` and return where everything was written.

    Metrics go to the run's metrics file, live to the Accelerate trackers of train.report_to and `trackers`
    (GeneralTracker objects), and to each of `callbacks`. `given`: records in memory by split (train, eval),
    read instead of the config's data files and saved where those name, in the run dir, at its start.

    SIGINT (Ctrl-C) or SIGTERM: the current step finishes, a resumable checkpoint is saved and Interrupted
    is raised saying how to resume; a second signal stops at once (KeyboardInterrupt). `expected_reference`:
    why model.reference is not the start (the rounds set it), said instead of a warning."""
    with StopSignals("the run finishes its step, saves a resumable checkpoint and stops") as stop:
        return _train(cfg, trackers, callbacks, given, stop, expected_reference)


def _train(
    cfg: Config, trackers, callbacks: Sequence[Callback], given, stop: StopSignals, expected_reference=None
) -> RunResult:
    started = time.perf_counter()
    cfg = with_run_dir(cfg)
    run = Run(cfg.train.run_dir)
    run.check(cfg.train.resume, cfg.train.overwrite)
    s = setup(cfg, str(run.path), trackers, given)
    if stop.received:  # nothing is written before the run dir starts
        raise Interrupted(f"{stop.name} before training started: nothing was written", stop.received)
    run.check_space(checkpoint_bytes(cfg, s.policy))
    acc, t, e = s.accelerator, cfg.train, cfg.eval
    schedule = list(step_schedule(len(s.data.train), t, acc.num_processes, s.train_groups()))
    resume = resume_point(run, len(schedule)) if t.resume else None
    if resume is not None and resume["complete"]:
        return finished_run(run, resume)
    optimizer = build_optimizer(s.policy.parameters(), t)
    scheduler = build_scheduler(optimizer, t, len(schedule))
    # full fine-tuning's frozen reference is copied before prepare, which may shard the policy in place
    frozen = references.frozen_start(cfg, s.objective, s.policy, s.reference_model, s.reload_start)
    policy, optimizer = prepare(s, optimizer, schedule)
    # from_pretrained returns eval mode: without this, LoRA dropout and activation checkpointing stay off.
    policy.train()
    start_step = resume["step"] if resume else 0
    # Built before any update (and before a resumed run loads its weights): every strategy sees the start.
    train_ref, eval_ref, ref_stats = make_references(s, policy, schedule, start_step, frozen)
    if acc.is_main_process and not resume:
        run.start(cfg, s.data.stats, {name: d.records for name, d in (given or {}).items()})
    guards = Guards(t.drift_warn, t.flat_window, t.flat_min_delta, e.patience, e.min_delta)
    guards.warnings += s.warnings
    if cfg.model.reference and train_ref is not None and not resume:
        said = reference_gap_warning(s, policy, train_ref, schedule[0], expected_reference)
        if expected_reference:
            log.info(said)
        else:
            guards.warnings.append(said)
            log.warning(said)
    history, initial_eval = [], None
    if resume:
        history, initial_eval = restore(
            resume["folder"], run, s, policy, optimizer, scheduler, guards, len(schedule)
        )
    saver = Saver(run, s, policy, optimizer, scheduler, guards, len(schedule))

    def run_eval(step: int) -> dict:
        metrics, samples = evaluate_pairs(
            policy,
            eval_ref,
            s.objective,
            s.data.eval,
            lambda ids: s.batch(s.data.eval, ids),
            batch_size=e.batch_size,
            accelerator=acc,
            sample_pairs=e.sample_pairs,
            progress=t.progress,
        )
        if samples and acc.is_main_process:
            run.append_pair_samples(step, with_texts(samples, s))
        return {f"eval/{k}": v for k, v in metrics.items()}

    def interrupt(step: int, signum: int) -> None:
        kept = saver.save(step)
        message = (
            f"{signal.Signals(signum).name} after step {step} of {len(schedule)}: a resumable checkpoint is "
            f"saved ({kept}); continue with `dpokit train --resume {run.path}` (Python: "
            f"dpokit.train(resume={str(run.path)!r}))"
        )
        summarize(message, None, kept)
        raise Interrupted(message, signum)

    def summarize(stopped: str, final_eval: dict | None, ckpt: Path | None) -> None:
        if acc.is_main_process:
            run.write_summary(
                summary(
                    history,
                    initial_eval,
                    final_eval,
                    run.relative(ckpt),
                    time.perf_counter() - started,
                    stopped,
                    guards,
                )
                | {"reference": ref_stats}
            )

    log_record = record_sinks(run, cfg, acc, trackers)
    main = acc.is_main_process
    reporter = StepReporter(len(schedule), t.progress and main, start_step, log_lines=main and not t.progress)
    ckpt, steps_per_epoch = None, epoch_steps(len(s.data.train), t, acc.num_processes)
    if e.at_start and s.data.eval and not resume:
        initial_eval = run_eval(0)
        log_record({"step": 0, "epoch": 0.0, **initial_eval})
        reporter.print_eval(0, initial_eval)
    signum = stop_requests((), {"step": start_step}, acc, stop)[1]
    if signum:  # before the first step of this call: its start is saved, resumable
        interrupt(start_step, signum)
    with reporter:
        for step, micro_batches in enumerate(schedule, start=1):
            if step <= start_step:  # a resumed run replays nothing: the data order is a function of the step
                continue
            t0 = time.perf_counter()
            lr = scheduler.get_last_lr()[0]
            sums, tokens = accumulate_gradients(s, policy, train_ref, micro_batches)
            # under DeepSpeed the engine has clipped and stepped in the last backward: this reads its norm
            grad_norm = float(acc.clip_grad_norm_(policy.parameters(), t.max_grad_norm or math.inf))
            record = {"step": step, "epoch": step / steps_per_epoch, **sums.compute(acc)}
            if not (math.isfinite(record["loss"]) and math.isfinite(grad_norm)):
                applied = sharding.steps_in_backward(acc)  # DeepSpeed stepped inside the last backward
                # otherwise the update is not applied: the weights are still those of the last good step
                kept = (
                    run.latest_checkpoint if applied else saver.save(step - 1, f"step-{step - 1}-last-good")
                )
                reason = non_finite_message(record["loss"], grad_norm, step, cfg, kept, applied)
                summarize(reason, None, kept)
                raise TrainingError(reason)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            elapsed = time.perf_counter() - t0
            record.update(lr=lr, grad_norm=grad_norm, tokens_per_s=tokens / elapsed, step_time_s=elapsed)
            guards.on_step(record, cfg.loss.beta, lr)
            if ((e.every and step % e.every == 0) or step == len(schedule)) and s.data.eval:
                record.update(run_eval(step))
                reporter.print_eval(step, record)
                if guards.on_eval(record) and e.patience:
                    saver.save(step, Run.BEST)
            log_record(record)
            history.append(record)
            reporter.update(record)
            asked, signum = stop_requests(callbacks, record, acc, stop)
            guards.stop_reason = guards.stop_reason or asked
            if signum:
                interrupt(step, signum)
            if guards.stop_reason:
                break
            if t.checkpoint_every and step % t.checkpoint_every == 0 and step < len(schedule):
                saver.save(step)
    if cfg.train.report_to or trackers:
        acc.end_training()
    final_eval = {k: v for k, v in history[-1].items() if k.startswith("eval/")} or None
    if t.save_final:
        ckpt = saver.save(len(history))
    stopped = guards.stop_reason or "completed all steps"
    summarize(stopped, final_eval, ckpt)
    return RunResult(run, history, initial_eval, final_eval, ckpt, unwrap(policy).model, stopped)


def checkpoint_bytes(cfg: Config, model) -> int:
    """A rough lower bound on one checkpoint: the weights for full fine-tuning, and optimizer states twice
    that; 64 MiB for an adapter."""
    needed = 64 * 2**20
    if not cfg.lora.enabled and (cfg.train.checkpoint_every or cfg.train.save_final):
        needed += 3 * sum(p.numel() * p.element_size() for p in model.parameters())
    return needed


def record_sinks(run: Run, cfg: Config, acc, trackers: list | None):
    """`log(record)`: one record to the run's metrics file (process 0) and the live trackers."""
    live = bool(cfg.train.report_to or trackers)
    if live:
        acc.init_trackers(run.path.name, config=flat_config(cfg))

    def log_record(record: dict) -> None:
        if acc.is_main_process:
            run.append_metrics(record)
        if live:
            acc.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    return log_record


def stop_requests(
    callbacks: Sequence[Callback], record: dict, acc, stop: StopSignals
) -> tuple[str | None, int | None]:
    """(the first callback that asks to stop after this step, a stop signal received) agreed by every
    process: process 0's callbacks decide, a signal received by any process counts."""
    reason = None
    for fn in callbacks:
        if fn(dict(record)):
            reason = f"stopped by callback {getattr(fn, '__name__', repr(fn))} after step {record['step']}"
            break
    if acc.num_processes == 1:
        return reason, stop.received
    from accelerate.utils import gather_object

    asked = gather_object([(reason, stop.received)])
    return asked[0][0], next((sig for _, sig in asked if sig), None)


def summary(
    history, initial_eval, final_eval, ckpt: str | None, wall_s: float, stopped: str, guards: Guards
) -> dict:
    """What the run's summary holds: why and how it ended; `ckpt`: the final checkpoint, relative to the run
    dir."""
    out = {
        "steps": len(history),
        "stopped": stopped,
        "warnings": guards.warnings,
        "best_eval_margin": guards.best,
        "best_eval_step": guards.best_step,
        "final_train": history[-1] if history else None,
        "initial_eval": initial_eval,
        "final_eval": final_eval,
        "checkpoint": ckpt,
        "wall_s": wall_s,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    if torch.cuda.is_initialized():  # the memory that limits a GPU run: this process's peak on its device
        out["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def prepare(s: Session, optimizer, schedule: list):
    """The policy and its optimizer through Accelerate's prepare (DDP, FSDP2 or DeepSpeed, as launched):
    DeepSpeed's config is filled from the run first; under ZeRO-3 the LM head runs in one chunk
    (sharding.one_head_call)."""
    acc = s.accelerator
    micro_pairs = len(mine(schedule[0], acc.process_index, acc.num_processes)[0])
    fit_deepspeed(acc, micro_pairs, s.cfg.train.max_grad_norm)
    policy, optimizer = acc.prepare(s.policy, optimizer)
    if sharding.zero3(policy):
        sharding.one_head_call(unwrap(policy))
    return policy, optimizer


def accumulate_gradients(
    s: Session, policy, reference, micro_batches: list[list[int]]
) -> tuple[PairMetrics, int]:
    """Forward + backward over this process's micro-batches of one optimizer step; returns their metric
    sums and tokens. The loss is the sum over the step's pairs divided by the step's pairs (all processes),
    times the process count because DDP averages gradients: batch 4 x accum 1 == batch 1 x accum 4 ==
    2 processes x batch 2."""
    acc = s.accelerator
    sums, tokens = PairMetrics(), 0
    step_pairs = sum(len(m) for m in micro_batches)
    own = mine(micro_batches, acc.process_index, acc.num_processes)
    for i, indices in enumerate(own):
        batch = s.batch(s.data.train, indices)
        last = i == len(own) - 1
        acc.sync_gradients = last  # DeepSpeed's accumulation boundary: its engine steps in that backward
        with contextlib.nullcontext() if last else acc.no_sync(policy):
            out, extras = s.objective(policy, reference, batch)
            acc.backward((out.losses * batch.weights).sum() * acc.num_processes / step_pairs)
        sums.add(out, extras)
        tokens += batch.num_tokens
    return sums, tokens


def make_references(s: Session, policy, schedule: list, start_step: int, frozen=None):
    """(train reference, eval reference, counts for the summary): None for reference-free losses (nothing
    is built or run); cached log-probs of exactly the micro-batches this process will run, with
    train.precompute_ref; else the live reference (`frozen`: references.frozen_start's copy)."""
    cfg, acc = s.cfg, s.accelerator
    if not s.objective.needs_reference:
        return None, None, None
    if not cfg.train.precompute_ref:
        ref = references.for_training(cfg, policy, s.reference_model, frozen, acc)
        return ref, ref, None
    rank, world = acc.process_index, acc.num_processes
    train_batches = [b for step in schedule[start_step:] for b in mine(step, rank, world)]
    eval_ids = [ids for ids, _ in eval_batches(len(s.data.eval), cfg.eval.batch_size, rank, world)]
    splits = {
        "train": (s.data.train, train_batches, lambda ids: s.batch(s.data.train, ids)),
        "eval": (s.data.eval, eval_ids, lambda ids: s.batch(s.data.eval, ids)),
    }
    weights = (lambda b: ld_token_weights(b, cfg.loss.ld_alpha)) if cfg.loss.ld_alpha != 1.0 else None
    progress = cfg.train.progress and rank == 0
    refs, stats = references.precomputed(
        cfg, policy, splits, s.layout.attention, weights, progress, s.reference_model, acc
    )
    log.info("reference log-probs: %s", {k: v for k, v in stats.items() if k != "cache"})
    return refs["train"], refs["eval"], stats


@torch.no_grad()
def reference_gap_warning(
    s: Session, policy, reference, first_step: list[list[int]], expected: str | None = None
) -> str:
    """DPO's reference is the policy's starting point (step-1 loss ln 2); model.reference names another.
    Measured on the first micro-batch, with dropout off (no random draw is taken from the run). `expected`:
    why the caller chose this reference (the rounds), said instead of the advice to a user who set it."""
    from dpokit.reference import eval_mode

    batch = s.batch(
        s.data.train, mine(first_step, s.accelerator.process_index, s.accelerator.num_processes)[0]
    )
    with eval_mode(policy):
        out, extras = s.objective(policy, reference, batch)
    ratio = (
        torch.cat([extras["logratio/chosen"], extras["logratio/rejected"]])
        if "logratio/chosen" in extras
        else None
    )
    gap = (
        f", mean log-ratio log pi/pi_ref {float(ratio.mean()):+.4f} per sequence" if ratio is not None else ""
    )
    measured = f"on the first batch the loss is {float(out.losses.mean()):.4f} (ln 2 = 0.6931 when the reference is the start){gap}"
    if expected:
        return f"{expected}: {measured}"
    return (
        f"model.reference={s.cfg.model.reference!r} is not the policy's starting point: {measured}. "
        "DPO measures rewards against the reference; keep it if you mean to, else leave model.reference empty"
    )


def precompute_reference(cfg: Config, given: dict | None = None) -> dict | None:
    """`dpokit precompute-ref`: fill the on-disk reference cache for the micro-batches the config's run will
    visit and for its eval batches; returns the counts and the cache folder (None: the loss uses no
    reference). `given`: records in memory, as for `train`."""
    import dataclasses

    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, precompute_ref=True))
    s = setup(cfg, given=given)
    if not s.objective.needs_reference:
        return None
    schedule = list(
        step_schedule(len(s.data.train), cfg.train, s.accelerator.num_processes, s.train_groups())
    )
    # prepared as the run prepares it, so the cache finds the same weights, layout and sharding; the
    # optimizer is never stepped (FSDP2 and DeepSpeed prepare a model only with one)
    policy, _ = prepare(s, build_optimizer(s.policy.parameters(), cfg.train), schedule)
    return make_references(s, policy, schedule, 0)[2]


def finished_run(run: Run, resume: dict) -> RunResult:
    log.warning(
        "%s: the run is complete (%s; checkpoint %s, step %d of %d); nothing to resume",
        run.path,
        resume["stopped"],
        resume["folder"].name,
        resume["step"],
        resume["total"],
    )
    return RunResult(
        run, run.history, None, None, resume["folder"], None, resume["stopped"], already_complete=True
    )


def with_texts(samples: list[dict], s: Session) -> list[dict]:
    """The held-out pairs' per-pair values with their text (the report's log-ratio picture)."""
    for row in samples:
        pair = s.data.eval[row["index"]]
        row.update(
            {k: s.tokenizer.decode(getattr(pair, f"{k}_ids")) for k in ("prompt", "chosen", "rejected")}
        )
    return samples


def non_finite_message(
    loss: float, grad_norm: float, step: int, cfg: Config, kept: Path | None, applied: bool = False
) -> str:
    """`kept`: the last good weights, saved now; or, when DeepSpeed `applied` the update inside backward
    before the loop saw the numbers, the newest step checkpoint."""
    if applied:
        update = "and DeepSpeed applied the update inside backward"
        said = f"the newest checkpoint is {kept}" if kept else "no checkpoint was written before it"
    else:
        update = "so the update was not applied"
        said = f"the last good weights (after step {step - 1}) are in {kept}" if kept else "nothing was saved"
    return (
        f"stopped at step {step}: loss={loss}, grad_norm={grad_norm} is not finite, {update}; "
        f"{said}. Likely causes: train.lr={cfg.train.lr} too high, loss.beta={cfg.loss.beta} too high for the "
        "log-prob scale, an empty or fully truncated completion, or bf16 overflow. Fix: lower train.lr, lower "
        "loss.beta, check the data with `dpokit data check`, or set train.bf16=false."
    )


def flat_config(cfg: Config) -> dict:
    """The config as `section.key: value` scalars (lists as strings), which every tracker accepts."""
    return {
        f"{sec}.{k}": (v if isinstance(v, (int, float, str, bool)) else str(v))
        for sec, d in asdict(cfg).items()
        for k, v in d.items()
    }
