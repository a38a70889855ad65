"""On-policy iterative DPO (`dpokit iterate`): rounds of sample -> score -> pair -> train -> evaluate.

DPO learns only from the pairs it is given; here each round draws them from the policy the previous round
trained (RLHFlow's Online-RLHF recipe: K samples per prompt at temperature 1, best against worst by a
reward, ties dropped, the reference fixed at the initial model).

Its run dir (rundir.Run, rundir.Round name the files) holds the config, the initial model's held-out
completions (sampled once), and per round R = 1, 2, ...: K completions per prompt from the policy the round
starts from, their scores (reward or judge, minus the missing-EOS penalty), the pairs (a preference file)
and their counts, the round's training run (a run dir: report / eval / resume work on it), held-out
figures, and the round's summary, written last, which marks the round done; and every finished round's
summary together (`dpokit report RUN` shows it).

Every phase reads its inputs from the files of the phases before it and writes its output atomically, and
every random draw is seeded by (iterate.seed, round): a run killed at any moment and started again redoes
only the unfinished phase and ends with the same files and weights. The policy a round samples from is
always read back from the previous round's checkpoint, in a fresh run as in a resumed one.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from dpokit import models
from dpokit.checkpoint import save_checkpoint
from dpokit.config import Config, ConfigError, dump_yaml
from dpokit.data.prompts import load_prompts
from dpokit.data.readers import InMemory
from dpokit.errors import Interrupted, UsageError
from dpokit.evaluation import generation_metrics, sampled_kl
from dpokit.files import read_jsonl, write_jsonl
from dpokit.generate import Sample, SamplingSettings, sample
from dpokit.interpolation import between
from dpokit.labels import TOKEN_ENV
from dpokit.labels.judge import HUMAN, add_round, human_scores, wait_for_labels
from dpokit.labels.store import Store
from dpokit.pairing import judge_scores, make_pairs, pair_stats, penalized
from dpokit.rewards import as_judge, as_reward, prompt_texts, score_samples
from dpokit.rundir import Run, with_run_dir
from dpokit.stopping import StopSignals
from dpokit.trained import Trained, load_start, load_trained
from dpokit.validation import validate

log = logging.getLogger(__name__)
FAULT_ENV = "DPOKIT_KILL_AT"
"""Fault injection for the resume tests: `PHASE:ROUND` (sampling, scoring, pairing, training, kl_budget,
eval) kills
the process with SIGKILL inside that phase, before its output is written (training: at step 2)."""


@dataclass
class RoundResult:
    round: int
    folder: Path
    summary: dict


def _fault(phase: str, r: int) -> None:
    if os.environ.get(FAULT_ENV) == f"{phase}:{r}":
        log.warning("%s=%s: killing this process", FAULT_ENV, os.environ[FAULT_ENV])
        os.kill(os.getpid(), signal.SIGKILL)


def _kill_at_step(r: int, step: int = 2):
    """A training callback: the training fault, at step 2 (after step 1's checkpoint when
    train.checkpoint_every=1)."""

    def kill(record: dict) -> None:
        if record["step"] == step:
            _fault("training", r)

    return kill


class Iteration:
    """One `dpokit iterate` run: its config, run dir, prompts and scorer. Prompts, reward and judge may be
    given in memory (the Python API); else the config names them."""

    def __init__(
        self, cfg: Config, root: Path, prompts=None, eval_prompts=None, reward=None, judge=None, near=()
    ):
        self.cfg, self.it, self.run = cfg, cfg.iterate, Run(root)
        it = self.it
        # every user-supplied piece is checked before a model is loaded or a file written
        self.given = {
            k: v for k, v in (("prompts", prompts), ("eval_prompts", eval_prompts)) if v is not None
        }
        self.prompts = load_prompts(prompts or it.prompts, it.prompts_split or None, 0, "iterate.prompts")
        held_out = eval_prompts or it.eval_prompts
        self.eval_prompts = (
            load_prompts(held_out, it.eval_split or None, it.eval_num_prompts, "iterate.eval_prompts")
            if held_out
            else []
        )
        # `near`: where a module:function may lie besides sys.path (the config file's folder)
        self.human = judge is None and it.judge == HUMAN
        if self.human:  # a busy port or a missing token: said now, not after a round's sampling
            from dpokit.labels.app import bind

            bind(it.label_host, it.label_port, os.environ.get(TOKEN_ENV, "")).close()
        self.judge = as_judge(judge or it.judge, near) if (judge or it.judge) and not self.human else None
        self.reward = as_reward(reward or it.reward, near) if (reward or it.reward) else None
        self.model_path = models.resolve_model_path(cfg.model.name)
        self.tokenizer = models.load_tokenizer(
            self.model_path, cfg.model.trust_remote_code, cfg.data.chat_template
        )
        self.callbacks: list = []
        self.stop: StopSignals | None = None
        """Called with every step record of every round's training (the API's callbacks)."""

    def checkpoint(self, r: int) -> Path | None:
        """The weights round r ended with (None for r = 0: the initial model): its training's final
        checkpoint, or where iterate.kl_budget pulled it back to."""
        return None if r == 0 else self.run.round(r).policy_checkpoint

    def round_prompts(self, r: int) -> list:
        n = self.it.prompts_per_round or len(self.prompts)
        start = (r - 1) * n if self.it.fresh_prompts else 0
        return [self.prompts[(start + i) % len(self.prompts)] for i in range(min(n, len(self.prompts)))]

    def sampling(self, seed: int) -> SamplingSettings:
        it = self.it
        return SamplingSettings(
            max_new_tokens=it.max_new_tokens,
            temperature=it.temperature,
            top_p=it.top_p,
            batch_size=it.sample_batch_size,
            seed=seed,
            bf16=self.cfg.train.bf16,
        )

    # ---- models
    def load_policy(self, r: int):
        """The policy after round r (r = 0: the initial model), for sampling; frozen, eval mode."""
        if r == 0:
            return load_start(self.cfg).model
        return load_trained(self.run.round(r).train, checkpoint=self.checkpoint(r)).model

    def compared(self, r: int) -> Trained:
        """Round r's policy against the initial model: its adapter switched off (LoRA), else the initial
        model itself."""
        initial = "base" if self.cfg.lora.enabled else self.cfg.model.name
        return load_trained(self.run.round(r).train, checkpoint=self.checkpoint(r), reference=initial)

    # ---- phases
    def sample_round(self, r: int) -> list[dict]:
        done = self.run.round(r).read("samples")
        if done is not None:
            return done
        prompts = self.round_prompts(r)
        drawn = sample(
            self.load_policy(r - 1),
            self.tokenizer,
            prompts,
            self.it.samples_per_prompt,
            self.sampling(self.it.seed * 1000 + r),
            self.cfg.train.progress,
            f"round {r}: sampling {self.it.samples_per_prompt} per prompt",
        )
        _fault("sampling", r)
        records = [_sample_record(p, row) for p, row in zip(prompts, drawn, strict=True)]
        self.run.round(r).write("samples", records)
        return records

    def score_round(self, r: int, samples: list[dict]) -> list[dict]:
        done = self.run.round(r).read("scores")
        if done is not None:
            return done
        if self.human:
            raw = self.human_scores(r, samples)
        elif self.judge is not None:
            texts = prompt_texts([s["prompt"] for s in samples], self.tokenizer)
            raw = [judge_scores(self.judge, t, s["completions"]) for t, s in zip(texts, samples, strict=True)]
        else:
            flat = score_samples(
                self.reward,
                [s["prompt"] for s in samples for _ in s["completions"]],
                [c for s in samples for c in s["completions"]],
                self.tokenizer,
            )
            k = self.it.samples_per_prompt
            raw = [flat[i * k : (i + 1) * k] for i in range(len(samples))]
        _fault("scoring", r)
        records = [
            {
                "raw": row,
                "scores": penalized(
                    row, s["finished"], self.it.eos_penalty, s["lengths"], self.it.length_penalty
                ),
            }
            for row, s in zip(raw, samples, strict=True)
        ]
        self.run.round(r).write("scores", records)
        return records

    def human_scores(self, r: int, samples: list[dict]) -> list[list[float]]:
        """iterate.judge=human: round r's comparisons in the run's labeling folder, served until labeled."""
        store = Store(self.run.labels, create=True)
        store.set_setting("overlap", self.it.label_overlap)
        add_round(store, r, samples)
        wait_for_labels(store, r, self.it, self.stop, self.resume_hint())
        return human_scores(store, r, samples)

    def pair_round(self, r: int, samples: list[dict], scores: list[dict]) -> dict:
        done = self.run.round(r).read("pair_stats")
        if done is not None:
            return done
        pairs, ties, identical, margins = make_pairs(samples, scores, self.it.pairing, self.it.min_score_gap)
        if not pairs:
            raise UsageError(
                f"round {r}: every pair was a tie ({ties} ties, {identical} identical texts): the samples of a "
                f"prompt all scored within iterate.min_score_gap={self.it.min_score_gap}. Raise "
                "iterate.samples_per_prompt or iterate.temperature, or lower min_score_gap"
            )
        stats = pair_stats(samples, scores, pairs, ties, identical, margins)
        _fault("pairing", r)
        self.run.round(r).write("pairs", pairs)
        self.run.round(r).write("pair_stats", stats)  # last: marks the phase done
        return stats

    def round_config(self, r: int, resume: bool) -> Config:
        """The run config of round r's training: the iterate config's sections, with this round's pairs,
        run dir and starting point, checked as any training config."""
        cfg, round_, prev = self.cfg, self.run.round(r), self.checkpoint(r - 1)
        model, initial = cfg.model, self.it.reference == "initial"
        if (
            prev is not None and cfg.lora.enabled
        ):  # continue the adapter; pi_ref = the base, or where it starts
            model = replace(model, adapter=str(prev), reference="base" if initial else "")
        elif prev is not None:
            model = replace(model, name=str(prev), reference=cfg.model.name if initial else "")
        round_cfg = replace(
            cfg,
            model=model,
            data=replace(cfg.data, train=str(round_.pairs_path)),
            # a prompt's pairs share micro-batches, where its samples are computed once
            train=replace(
                cfg.train,
                lr=cfg.train.lr * self.it.lr_decay ** (r - 1),
                run_dir=str(round_.train.path),
                group_by_prompt=True,
                resume=resume,
                overwrite=not resume,
            ),
        )
        problems = validate(round_cfg)
        if problems:
            raise ConfigError(problems)
        return round_cfg

    def train_round(self, r: int) -> dict:
        from dpokit.loop import train

        run = self.run.round(r).train
        if (run.summary or {}).get("checkpoint"):
            return run.summary
        resume = run.latest_checkpoint is not None
        fault = [_kill_at_step(r)] if os.environ.get(FAULT_ENV) == f"training:{r}" else []
        cfg = self.round_config(r, resume)
        expected = (  # iterate.reference=initial sets model.reference from round 2 on
            f"round {r} measures rewards against the initial model (iterate.reference=initial), not the "
            "policy it starts from"
            if cfg.model.reference
            else None
        )
        train(cfg, callbacks=[*self.callbacks, *fault], expected_reference=expected)
        return run.summary

    def fit_kl_budget(self, r: int) -> dict | None:
        """iterate.kl_budget: measure round r's held-out KL to the initial model; above the budget, pull the
        round back along the line from the previous round's weights to its own (interpolation.between), by
        bisection, to the furthest point measured within the budget; write those weights (Round.pulled_path),
        then the record of the pull (which marks the phase done)."""
        budget = self.it.kl_budget
        if budget <= 0:
            return None
        round_ = self.run.round(r)
        done = round_.read("kl_budget")
        if done is not None:
            return done
        trained = load_trained(
            round_.train, reference="base" if self.cfg.lora.enabled else self.cfg.model.name
        )
        end, start = policy_state(trained), self.previous_state(r, trained)
        tried = {1.0: self.held_out_kl(trained)}
        low, high = 0.0, 1.0
        if tried[1.0] > budget:
            for _ in range(BUDGET_BISECTIONS):
                lam = (low + high) / 2
                load_policy_state(trained, between(start, end, lam))
                tried[lam] = self.held_out_kl(trained)
                low, high = (lam, high) if tried[lam] <= budget else (low, lam)
        lam = 1.0 if tried[1.0] <= budget else low
        record = {
            "budget": budget,
            "lambda": lam,
            "kl_before": tried[1.0],
            "kl": tried[lam] if lam in tried else self.kl_at_start(r),
            "pulled": lam < 1.0,
            "tried": [{"lambda": k, "kl": v} for k, v in sorted(tried.items())],
        }
        if record["pulled"]:
            load_policy_state(trained, between(start, end, lam))
            save_checkpoint(
                trained.model,
                trained.tokenizer,
                round_.pulled_path,
                Run.checkpoint_step(round_.train.checkpoint()) or 0,
                extra={"kl_budget": {k: v for k, v in record.items() if k != "tried"}},
            )
            log.warning(
                "round %d: held-out KL %.2f nats is over iterate.kl_budget=%g: pulled back to lambda=%.4g between "
                "round %d and its training (KL %.2f); %s from there (%s)",
                r,
                record["kl_before"],
                budget,
                lam,
                r - 1,
                record["kl"],
                f"round {r + 1} continues" if r < self.it.rounds else "the run ends",
                round_.pulled_path,
            )
        _fault("kl_budget", r)
        round_.write("kl_budget", record)
        return record

    def kl_at_start(self, r: int) -> float:
        """The held-out KL of the weights round r started from (lambda 0): round r - 1's, within the budget."""
        return 0.0 if r == 1 else self.run.round(r - 1).read("kl_budget")["kl"]

    def previous_state(self, r: int, trained: Trained) -> dict:
        """The weights round r started from, in the form policy_state gives: round r - 1's, or the initial
        model's (LoRA: the same A with B = 0, which is the base exactly)."""
        if r > 1:
            return policy_state(load_trained(self.run.round(r - 1).train, checkpoint=self.checkpoint(r - 1)))
        if trained.is_lora:
            return {
                k: v if not _is_lora_b(k) else torch.zeros_like(v) for k, v in policy_state(trained).items()
            }
        return {k: v.detach().clone() for k, v in load_start(self.cfg).model.state_dict().items()}

    def held_out_kl(self, trained: Trained) -> float:
        """KL(policy || initial model) in nats per completion, sampled on the held-out prompts as each
        round's evaluation samples them."""
        drawn = sample(
            trained.model,
            self.tokenizer,
            self.eval_prompts,
            self.it.eval_samples,
            self.eval_sampling(),
            self.cfg.train.progress,
            "kl_budget: held-out samples",
        )
        return float(sampled_kl(trained, drawn).mean())

    def initial_eval_samples(self) -> list[list[Sample]]:
        done = self.run.initial_samples
        if done is None:
            drawn = sample(
                self.load_policy(0),
                self.tokenizer,
                self.eval_prompts,
                self.it.eval_samples,
                self.eval_sampling(),
                self.cfg.train.progress,
                "initial model: held-out samples",
            )
            done = [_sample_record(p, row) for p, row in zip(self.eval_prompts, drawn, strict=True)]
            self.run.write_initial_samples(done)
        return [_samples_of(rec) for rec in done]

    def eval_sampling(self) -> SamplingSettings:
        # the same draws every round (common random numbers): rounds differ by their policy only
        return self.sampling(self.it.seed * 1000 + 999)

    def evaluate_round(self, r: int) -> dict | None:
        if not self.eval_prompts:
            return None
        round_ = self.run.round(r)
        done = round_.read("eval")
        if done is not None:
            return done
        initial = self.initial_eval_samples()
        gen, records = generation_metrics(
            self.compared(r),
            self.eval_prompts,
            self.reward,
            self.it.eval_samples,
            self.eval_sampling(),
            reference_samples=initial,
            progress=self.cfg.train.progress,
        )
        gen["win_rate/initial"] = gen.pop("win_rate")
        gen["win_rate/previous"] = self.win_rate_over_previous(r, records)
        _fault("eval", r)
        round_.write("eval_samples", records)
        round_.write("eval", gen)
        return gen

    def win_rate_over_previous(self, r: int, records: list[dict]) -> float:
        if r == 1:
            key, prev = "reward_reference", records
        else:
            key, prev = "reward_policy", self.run.round(r - 1).read("eval_samples")
        wins = [
            1.0 if a > b else 0.5 if a == b else 0.0
            for now, before in zip(records, prev, strict=True)
            for a, b in zip(now["reward_policy"], before[key], strict=True)
        ]
        return sum(wins) / len(wins)

    def run_round(self, r: int, stop: StopSignals | None = None) -> RoundResult:
        """Round r, or what is left of it; a stop signal ends the round after its current phase (which is
        kept: written whole) with Interrupted."""
        round_ = self.run.round(r)
        if round_.done:
            return RoundResult(r, round_.path, round_.summary)
        round_.path.mkdir(parents=True, exist_ok=True)
        self.stop = stop
        between = (lambda phase: self.stop_after(phase, r, stop)) if stop else (lambda phase: None)
        samples = self.sample_round(r)
        between("sampling")
        scores = self.score_round(r, samples)
        between("scoring")
        pairs = self.pair_round(r, samples, scores)
        between("pairing")
        try:
            train_summary = self.train_round(r)
        except Interrupted as err:  # the round's training saved its step: the rounds resume from there
            raise Interrupted(
                f"round {r}, training: {err.args[0].split(';')[0]}; {self.resume_hint()}", err.signum
            ) from None
        between("training")
        budget = self.fit_kl_budget(r)
        gen = self.evaluate_round(r)
        summary = {"round": r, "data": pairs, "train": _train_figures(train_summary), "eval": gen}
        if budget is not None:
            summary["kl_budget"] = budget
        round_.write("summary", summary)
        return RoundResult(r, round_.path, summary)

    def stop_after(self, phase: str, r: int, stop: StopSignals) -> None:
        if stop.received:
            raise Interrupted(
                f"{stop.name} in round {r}: its {phase} is done and kept; {self.resume_hint()}", stop.received
            )

    def resume_hint(self) -> str:
        return f"continue with `dpokit iterate --resume {self.run.path}` (Python: dpokit.iterate(resume=...))"


TIMING = ("tokens_per_s", "step_time_s")
BUDGET_BISECTIONS = 5
"""iterate.kl_budget's halvings of the line from the previous round to the round: lambda to 1/32."""


def policy_state(trained: Trained) -> dict:
    """The weights a round trains, by name: a LoRA policy's adapter (PEFT's names), else the whole model."""
    if trained.is_lora:
        from peft import get_peft_model_state_dict

        return {k: v.detach().clone() for k, v in get_peft_model_state_dict(trained.model).items()}
    return {k: v.detach().clone() for k, v in trained.model.state_dict().items()}


def load_policy_state(trained: Trained, state: dict) -> None:
    if trained.is_lora:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(trained.model, state)
    else:
        trained.model.load_state_dict(state)


def _is_lora_b(name: str) -> bool:
    return ".lora_B." in name or ".lora_embedding_B." in name


def _train_figures(summary: dict) -> dict:
    """What the round summary keeps of a round's training: the figures a rerun reproduces (no timings)."""
    final = {k: v for k, v in (summary.get("final_train") or {}).items() if k not in TIMING}
    return {"steps": summary["steps"], "stopped": summary["stopped"], "final_train": final}


def _sample_record(prompt, row: list[Sample]) -> dict:
    return {
        "prompt": prompt,
        "completions": [s.completion for s in row],
        "finished": [s.finished for s in row],
        "lengths": [len(s.completion_ids) for s in row],
        "prompt_ids": row[0].prompt_ids,
        "completion_ids": [s.completion_ids for s in row],
    }


def _samples_of(rec: dict) -> list[Sample]:
    return [
        Sample(rec["prompt"], text, rec["prompt_ids"], ids, done)
        for text, ids, done in zip(rec["completions"], rec["completion_ids"], rec["finished"], strict=True)
    ]


def prepare_root(cfg: Config, given: dict[str, InMemory] | None = None) -> Run:
    """The run folder: new, or the same config's unfinished run (continued), or refused. Prompts given in
    memory are saved with a new run (where the config names them) and must equal those of a continued one."""
    t = cfg.train
    run = Run(t.run_dir)
    text = dump_yaml(replace(cfg, train=replace(t, resume=False, overwrite=False)))
    if run.exists and not t.overwrite:
        if run.config_text != text:
            raise UsageError(
                f"{run.path} holds an iterate run with another config; continue it with `dpokit iterate --resume "
                f"{run.path}`, or set train.overwrite=true to start over, or choose another train.run_dir"
            )
        for name, records in (given or {}).items():
            if read_jsonl(run.data_file(name)) != records.records:
                raise UsageError(
                    f"{run.path} holds an iterate run with other {name}: continue it with the same ones, or set "
                    "train.overwrite=true to start over, or choose another train.run_dir"
                )
        return run
    if run.path.exists() and any(run.path.iterdir()) and not t.overwrite:
        raise UsageError(
            f"{run.path} exists and is not empty; set train.overwrite=true or choose another train.run_dir"
        )
    if t.overwrite and run.path.exists():
        shutil.rmtree(run.path)
    run.path.mkdir(parents=True, exist_ok=True)
    for name, records in (given or {}).items():
        run.data_file(name).parent.mkdir(exist_ok=True)
        write_jsonl(run.data_file(name), records.records, atomic=True)
    run.write_config(text)
    return run


def run_iterate(cfg: Config, **given) -> list[RoundResult]:
    """Run (or continue) every round of `cfg`; returns each round's summary. `given`: prompts, eval_prompts
    (data.InMemory), reward, judge (callables), callbacks, and `near` (folders to import a module:function
    reward or judge from, besides sys.path), from the Python API."""
    cfg = with_run_dir(cfg, "iterate-")
    callbacks = given.pop("callbacks", [])
    it = Iteration(cfg, Path(cfg.train.run_dir), **given)  # inputs are checked before the folder is made
    it.callbacks = list(callbacks)
    it.run = prepare_root(cfg, it.given)
    results = []
    with StopSignals("the round's current phase finishes, is saved, and the run stops") as stop:
        for r in range(1, cfg.iterate.rounds + 1):
            result = it.run_round(r, stop)
            results.append(result)
            it.run.write_iterate_summary([x.summary for x in results])
            log.info("round %d: %s", r, round_line(result.summary))
    return results


def round_line(summary: dict) -> str:
    d, g = summary["data"], summary.get("eval") or {}
    line = (
        f"{d['pairs']} pairs ({d['ties_dropped']} ties dropped), score {d['score/mean']:.3f}, "
        f"margin {d['score_margin/mean']:.3f}, EOS {d['eos_share']:.2f}"
    )
    if g:
        line += (
            f"; held-out reward {g['reward/policy']:.3f} (initial {g['reward/reference']:.3f}), win rate "
            f"{g['win_rate/initial']:.3f} vs initial / {g['win_rate/previous']:.3f} vs previous, KL "
            f"{g['kl/sequence']:.2f} nats ({g['kl/token']:.3f}/token)"
        )
    return line
