"""On-policy iterative DPO (`dpokit iterate`): rounds of sample -> score -> pair -> train -> evaluate.

DPO learns only from the pairs it is given; here each round draws them from the policy the previous round
trained (RLHFlow's Online-RLHF recipe: K samples per prompt at temperature 1, best against worst by a
reward, ties dropped, the reference fixed at the initial model).

    RUN/config.yaml          the iterate config
    RUN/eval_initial.jsonl   held-out completions of the initial model (sampled once)
    RUN/rounds/R/            R = 1, 2, ...
        samples.jsonl        K completions per prompt, from the policy round R starts from
        scores.jsonl         their scores (reward or judge, minus the missing-EOS penalty)
        pairs.jsonl          the pairs (a preference file) and pair_stats.json
        train/               the round's training run (a run dir: report / eval / resume work on it)
        eval.json            held-out figures (+ eval_samples.jsonl)
        round.json           the round's summary: written last, it marks the round done
    RUN/iterate.json         every finished round's summary (`dpokit report RUN` shows it)

Every phase reads its inputs from the files of the phases before it and writes its output atomically, and
every random draw is seeded by (iterate.seed, round): a run killed at any moment and started again redoes
only the unfinished phase and ends with the same files and weights. The policy a round samples from is
always read back from the previous round's checkpoint, in a fresh run as in a resumed one.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

from accelerate.tracking import GeneralTracker

from dpokit import models
from dpokit.config import Config, ConfigError, dump_yaml
from dpokit.errors import UsageError
from dpokit.evaluation import Compared, generation_metrics, load_prompts
from dpokit.files import write_file
from dpokit.generate import Sample, SamplingSettings, sample
from dpokit.metrics import read_metrics, write_jsonl
from dpokit.reference import Reference
from dpokit.rewards import get_judge, get_reward
from dpokit.session import layout_for
from dpokit.validation import validate

log = logging.getLogger(__name__)
FAULT_ENV = "DPOKIT_KILL_AT"
"""Fault injection for the resume tests: `PHASE:ROUND` (sampling, scoring, pairing, training, eval) kills
the process with SIGKILL inside that phase, before its output is written (training: at step 2)."""


@dataclass
class RoundResult:
    round: int
    folder: Path
    summary: dict


def pair_indices(scores: list[float], rule: str, min_gap: float) -> tuple[list[tuple[int, int]], int]:
    """(chosen index, rejected index) pairs of one prompt's samples, and how many were ties (score gap <=
    min_gap) and dropped. best_worst: the first highest against the first lowest score; all_pairs: every
    pair of samples, better one first."""
    if rule == "best_worst":
        best = max(range(len(scores)), key=lambda i: (scores[i], -i))
        worst = min(range(len(scores)), key=lambda i: (scores[i], i))
        if scores[best] - scores[worst] <= min_gap:
            return [], 1
        return [(best, worst)], 0
    pairs, ties = [], 0
    for i in range(len(scores)):
        for j in range(i + 1, len(scores)):
            if abs(scores[i] - scores[j]) <= min_gap:
                ties += 1
            else:
                pairs.append((i, j) if scores[i] > scores[j] else (j, i))
    return pairs, ties


def penalized(scores: list[float], finished: list[bool], penalty: float) -> list[float]:
    """TRL's missing_eos_penalty: a completion cut at max_new_tokens loses `penalty`."""
    return [s if done else s - penalty for s, done in zip(scores, finished, strict=True)]


def judge_scores(judge, prompt: str, completions: list[str]) -> list[float]:
    """Each completion's mean probability of beating the prompt's other completions (a round robin, both
    orders, so a judge's position bias cancels)."""
    k = len(completions)
    wins = [0.0] * k
    for i in range(k):
        for j in range(k):
            if i != j:
                p = judge(prompt, completions[i], completions[j])
                wins[i] += p
                wins[j] += 1.0 - p
    return [w / (2 * (k - 1)) for w in wins]


def _jsonl(path: Path, records: list[dict]) -> None:
    write_file(path, lambda tmp: write_jsonl(tmp, records))


def _json(path: Path, value) -> None:
    write_file(path, lambda tmp: tmp.write_text(json.dumps(value, indent=2, default=str)))


def _fault(phase: str, r: int) -> None:
    if os.environ.get(FAULT_ENV) == f"{phase}:{r}":
        log.warning("%s=%s: killing this process", FAULT_ENV, os.environ[FAULT_ENV])
        os.kill(os.getpid(), signal.SIGKILL)


class _KillAtStep(GeneralTracker):
    """A tracker for `train(trackers=...)`: the training fault, at step 2 (after step 1's checkpoint when
    train.checkpoint_every=1)."""

    name = "fault"
    requires_logging_directory = False
    main_process_only = True

    def __init__(self, r: int, step: int = 2):
        super().__init__()
        self.r, self.step = r, step

    def store_init_configuration(self, values):
        pass

    def log(self, values, step=None, **kwargs):
        if step == self.step:
            _fault("training", self.r)

    @property
    def tracker(self):
        return self


class Iteration:
    """One `dpokit iterate` run: its config, folder, prompts and scorer."""

    def __init__(self, cfg: Config, root: Path):
        self.cfg, self.it, self.root = cfg, cfg.iterate, root
        it = self.it
        # every user-supplied piece is checked before a model is loaded or a file written
        self.prompts = load_prompts(it.prompts, it.prompts_split or None, 0, "iterate.prompts")
        self.eval_prompts = (
            load_prompts(it.eval_prompts, it.eval_split or None, it.eval_num_prompts, "iterate.eval_prompts")
            if it.eval_prompts
            else []
        )
        self.judge = get_judge(it.judge) if it.judge else None
        self.reward = get_reward(it.reward) if it.reward else None
        self.model_path = models.resolve_model_path(cfg.model.name)
        self.tokenizer = models.load_tokenizer(self.model_path, cfg.model.trust_remote_code)

    # ---- where things are
    def folder(self, r: int) -> Path:
        return self.root / "rounds" / str(r)

    def checkpoint(self, r: int) -> Path | None:
        """The final checkpoint of round r's training (None for r = 0: the initial model)."""
        if r == 0:
            return None
        summary = json.loads((self.folder(r) / "train" / "summary.json").read_text())
        return Path(summary["checkpoint"])

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
        m, ckpt = self.cfg.model, self.checkpoint(r)
        full_ft = ckpt is not None and not self.cfg.lora.enabled
        model = models.load_model(
            str(ckpt) if full_ft else self.model_path, m.trust_remote_code, m.attn_implementation
        )
        if ckpt is not None and self.cfg.lora.enabled:
            model = models.load_adapter(model, str(ckpt), trainable=False)
        return model.eval().requires_grad_(False)

    def compared(self, policy, initial: Reference | None = None) -> Compared:
        """A round's policy against the initial model: its adapter switched off (LoRA), else `initial` or
        the initial model loaded now."""
        cfg = self.cfg
        if cfg.lora.enabled:
            return Compared.lora_run(policy, self.tokenizer, cfg)
        initial = initial or Reference.separate(
            self.load_policy(0), cfg.train.logps_chunk_size, cfg.train.bf16
        )
        return Compared(policy, initial, self.tokenizer, cfg.loss, layout_for(cfg, policy), cfg.train.bf16)

    # ---- phases
    def sample_round(self, r: int) -> list[dict]:
        path = self.folder(r) / "samples.jsonl"
        if path.exists():
            return read_metrics(path)
        prompts = self.round_prompts(r)
        policy = self.load_policy(r - 1)
        drawn = sample(
            policy,
            self.tokenizer,
            prompts,
            self.it.samples_per_prompt,
            self.sampling(self.it.seed * 1000 + r),
            self.cfg.train.progress,
            f"round {r}: sampling {self.it.samples_per_prompt} per prompt",
        )
        _fault("sampling", r)
        records = [_sample_record(p, row) for p, row in zip(prompts, drawn, strict=True)]
        _jsonl(path, records)
        return records

    def score_round(self, r: int, samples: list[dict]) -> list[dict]:
        path = self.folder(r) / "scores.jsonl"
        if path.exists():
            return read_metrics(path)
        texts = [self.prompt_text(s["prompt"]) for s in samples]
        if self.judge is not None:
            raw = [judge_scores(self.judge, t, s["completions"]) for t, s in zip(texts, samples, strict=True)]
        else:
            flat = self.reward(
                [t for t, s in zip(texts, samples, strict=True) for _ in s["completions"]],
                [c for s in samples for c in s["completions"]],
            )
            k = self.it.samples_per_prompt
            raw = [flat[i * k : (i + 1) * k] for i in range(len(samples))]
        _fault("scoring", r)
        records = [
            {"raw": row, "scores": penalized(row, s["finished"], self.it.eos_penalty)}
            for row, s in zip(raw, samples, strict=True)
        ]
        _jsonl(path, records)
        return records

    def pair_round(self, r: int, samples: list[dict], scores: list[dict]) -> dict:
        folder = self.folder(r)
        if (folder / "pair_stats.json").exists():
            return json.loads((folder / "pair_stats.json").read_text())
        pairs, ties, identical, margins = [], 0, 0, []
        for s, sc in zip(samples, scores, strict=True):
            found, t = pair_indices(sc["scores"], self.it.pairing, self.it.min_score_gap)
            ties += t
            for i, j in found:
                chosen, rejected = s["completions"][i], s["completions"][j]
                if chosen.strip() == rejected.strip():  # a reward of the text cannot tell them apart
                    identical += 1
                    continue
                margins.append(sc["scores"][i] - sc["scores"][j])
                pairs.append(
                    {
                        "prompt": s["prompt"],
                        "chosen": chosen,
                        "rejected": rejected,
                        "score_chosen": sc["scores"][i],
                        "score_rejected": sc["scores"][j],
                    }
                )
        if not pairs:
            raise UsageError(
                f"round {r}: every pair was a tie ({ties} ties, {identical} identical texts): the samples of a "
                f"prompt all scored within iterate.min_score_gap={self.it.min_score_gap}. Raise "
                "iterate.samples_per_prompt or iterate.temperature, or lower min_score_gap"
            )
        all_scores = [x for sc in scores for x in sc["scores"]]
        finished = [f for s in samples for f in s["finished"]]
        lengths = [n for s in samples for n in s["lengths"]]
        stats = {
            "prompts": len(samples),
            "samples": len(all_scores),
            "pairs": len(pairs),
            "ties_dropped": ties,
            "identical_dropped": identical,
            "score/mean": sum(all_scores) / len(all_scores),
            "score_margin/mean": sum(margins) / len(margins),
            "eos_share": sum(finished) / len(finished),
            "length/mean": sum(lengths) / len(lengths),
        }
        _fault("pairing", r)
        _jsonl(folder / "pairs.jsonl", pairs)
        _json(folder / "pair_stats.json", stats)  # last: marks the phase done
        return stats

    def round_config(self, r: int, resume: bool) -> Config:
        """The run config of round r's training: the iterate config's sections, with this round's pairs,
        run dir and starting point, checked as any training config."""
        cfg, folder, prev = self.cfg, self.folder(r), self.checkpoint(r - 1)
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
            data=replace(cfg.data, train=str(folder / "pairs.jsonl")),
            # a prompt's pairs share micro-batches, where its samples are computed once
            train=replace(
                cfg.train,
                run_dir=str(folder / "train"),
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
        from dpokit.checkpoint import latest_checkpoint
        from dpokit.train import train

        run = self.folder(r) / "train"
        summary = run / "summary.json"
        if summary.exists() and json.loads(summary.read_text()).get("checkpoint"):
            return json.loads(summary.read_text())
        resume = latest_checkpoint(run) is not None
        trackers = [_KillAtStep(r)] if os.environ.get(FAULT_ENV) == f"training:{r}" else None
        train(self.round_config(r, resume), trackers=trackers)
        return json.loads(summary.read_text())

    def initial_eval_samples(self) -> list[list[Sample]]:
        path = self.root / "eval_initial.jsonl"
        if not path.exists():
            model = self.load_policy(0)
            drawn = sample(
                model,
                self.tokenizer,
                self.eval_prompts,
                self.it.eval_samples,
                self.eval_sampling(),
                self.cfg.train.progress,
                "initial model: held-out samples",
            )
            _jsonl(path, [_sample_record(p, row) for p, row in zip(self.eval_prompts, drawn, strict=True)])
        return [_samples_of(rec) for rec in read_metrics(path)]

    def eval_sampling(self) -> SamplingSettings:
        # the same draws every round (common random numbers): rounds differ by their policy only
        return self.sampling(self.it.seed * 1000 + 999)

    def evaluate_round(self, r: int) -> dict | None:
        if not self.eval_prompts:
            return None
        folder = self.folder(r)
        if (folder / "eval.json").exists():
            return json.loads((folder / "eval.json").read_text())
        initial = self.initial_eval_samples()
        gen, records = generation_metrics(
            self.compared(self.load_policy(r)),
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
        _jsonl(folder / "eval_samples.jsonl", records)
        _json(folder / "eval.json", gen)
        return gen

    def win_rate_over_previous(self, r: int, records: list[dict]) -> float:
        if r == 1:
            key, prev = "reward_reference", records
        else:
            key, prev = "reward_policy", read_metrics(self.folder(r - 1) / "eval_samples.jsonl")
        wins = [
            1.0 if a > b else 0.5 if a == b else 0.0
            for now, before in zip(records, prev, strict=True)
            for a, b in zip(now["reward_policy"], before[key], strict=True)
        ]
        return sum(wins) / len(wins)

    def prompt_text(self, prompt) -> str:
        return (
            prompt if isinstance(prompt, str) else self.tokenizer.apply_chat_template(prompt, tokenize=False)
        )

    def run_round(self, r: int) -> RoundResult:
        folder = self.folder(r)
        if (folder / "round.json").exists():
            return RoundResult(r, folder, json.loads((folder / "round.json").read_text()))
        folder.mkdir(parents=True, exist_ok=True)
        samples = self.sample_round(r)
        scores = self.score_round(r, samples)
        pairs = self.pair_round(r, samples, scores)
        train_summary = self.train_round(r)
        gen = self.evaluate_round(r)
        summary = {"round": r, "data": pairs, "train": _train_figures(train_summary), "eval": gen}
        _json(folder / "round.json", summary)
        return RoundResult(r, folder, summary)


TIMING = ("tokens_per_s", "step_time_s")


def _train_figures(summary: dict) -> dict:
    """What round.json keeps of a round's training: the figures a rerun reproduces (no timings)."""
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


def prepare_root(cfg: Config) -> Path:
    """The run folder: new, or the same config's unfinished run (continued), or refused."""
    t = cfg.train
    root = Path(t.run_dir or Path("runs") / datetime.now().strftime("iterate-%Y%m%d-%H%M%S"))
    saved = root / "config.yaml"
    text = dump_yaml(replace(cfg, train=replace(t, run_dir=str(root), resume=False, overwrite=False)))
    if saved.exists() and not t.overwrite:
        if saved.read_text() != text:
            raise UsageError(
                f"{root} holds an iterate run with another config; continue it with `dpokit iterate --resume "
                f"{root}`, or set train.overwrite=true to start over, or choose another train.run_dir"
            )
    elif root.exists() and any(root.iterdir()) and not t.overwrite:
        raise UsageError(
            f"{root} exists and is not empty; set train.overwrite=true or choose another train.run_dir"
        )
    if t.overwrite and root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    saved.write_text(text)
    return root


def run_iterate(cfg: Config) -> list[RoundResult]:
    """Run (or continue) every round of `cfg`; returns each round's summary and writes RUN/iterate.json."""
    root = Path(cfg.train.run_dir) if cfg.train.run_dir else None
    it = Iteration(cfg, root or Path("."))  # inputs are checked before the folder is made
    it.root = prepare_root(cfg)
    results = []
    for r in range(1, cfg.iterate.rounds + 1):
        result = it.run_round(r)
        results.append(result)
        _json(it.root / "iterate.json", {"rounds": [x.summary for x in results]})
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
