"""The run directory, and the one type that knows its files: `Run`.

A run directory is the contract between stages: training writes it, evaluation, the rounds, export and the
report read it, and none of them imports another to do so. Every file of a run is named here and nowhere
else; `dpokit.train` returns a `Run`, and `dpokit.Run(path)` opens one that exists.

    RUN/config.yaml                the resolved config
    RUN/data_stats.json            records read, skipped, filtered, tokenized, truncated
    RUN/data/NAME.jsonl            data given in memory to the Python API, as the run trained on it
    RUN/metrics.jsonl              one record per optimizer step (step 0: the evaluation before training)
    RUN/pair_samples.jsonl         per-pair values of a few held-out pairs at each evaluation
    RUN/summary.json               why and how the run ended, and its final checkpoint
    RUN/checkpoints/step-N/        Hugging Face folders (adapter or model + tokenizer; resumable state)
    RUN/checkpoints/latest         the name of the newest step-N
    RUN/checkpoints/best           the best held-out margin (eval.patience)
    RUN/eval.json, eval_samples.jsonl   `dpokit eval` (and the demo)
    RUN/data_check.json, frontier.json, sweep/NAME/   the demo
    RUN/report.html                `dpokit report`

An iterate run (`dpokit iterate`) holds rounds instead (see `Round`): RUN/eval_initial.jsonl, RUN/iterate.json
and RUN/rounds/R/ with each round's phase files and its training run in RUN/rounds/R/train/ (and, where
iterate.kl_budget pulled the round back, the weights the round ended with in RUN/rounds/R/kl_budget/).

Imports neither torch nor the training code: the data tools and the report use it.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import tempfile
from datetime import datetime
from pathlib import Path

from dpokit.config import Config, dump_yaml
from dpokit.errors import TrainingError, UsageError
from dpokit.files import read_json, read_jsonl, to_json_line, write_json, write_jsonl

STEP_DIR = re.compile(r"^step-(\d+)$")
RESUMABLE = ("training_state.pt", "dpokit_state.json")
"""The files that make a step checkpoint resumable (checkpoint.py writes them)."""


def is_main_process() -> bool:
    """Rank 0 (or no launcher): the only process that writes the run dir."""
    return int(os.environ.get("RANK", "0")) == 0


def with_run_dir(cfg: Config, prefix: str = "") -> Config:
    """The config with train.run_dir filled in (empty = runs/<prefix><timestamp>, with -2, -3, ... when runs
    start within one second, as from a notebook); `cfg` is not changed."""
    if cfg.train.run_dir:
        return cfg
    stamp = Path("runs") / (prefix + datetime.now().strftime("%Y%m%d-%H%M%S"))
    free, n = stamp, 1
    while free.exists():
        n += 1
        free = stamp.with_name(f"{stamp.name}-{n}")
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, run_dir=str(free)))


def _nearest_existing(path: Path) -> Path:
    return next((p for p in [path, *path.parents] if p.exists()), Path("."))


class Run:
    """A run directory: its files by name, read when asked (so a run still going shows its latest state).

    `run.metrics`, `run.summary`, `run.config`, `run.final_checkpoint`, `run.load()`, `run.report()`; an
    iterate run has `run.rounds`."""

    CONFIG = "config.yaml"
    DATA_STATS = "data_stats.json"
    DATA = "data"
    METRICS = "metrics.jsonl"
    PAIR_SAMPLES = "pair_samples.jsonl"
    SUMMARY = "summary.json"
    CHECKPOINTS = "checkpoints"
    LATEST = "latest"
    BEST = "best"
    EVAL = "eval.json"
    EVAL_SAMPLES = "eval_samples.jsonl"
    DATA_CHECK = "data_check.json"
    FRONTIER = "frontier.json"
    SWEEP = "sweep"
    REPORT = "report.html"
    REWARD_MODEL = "reward_model"
    ITERATE = "iterate.json"
    INITIAL_SAMPLES = "eval_initial.jsonl"
    ROUNDS = "rounds"
    STALE = (METRICS, PAIR_SAMPLES, EVAL, EVAL_SAMPLES, REPORT, SUMMARY)
    """What an overwritten run's new start removes (the rest is replaced or left to a new run to replace)."""

    def __init__(self, path):
        self.path = Path(path)

    def __repr__(self) -> str:
        summary = self.summary
        state = f"{summary['steps']} steps, {summary['stopped']}" if summary else "no summary"
        if self.is_iterate:
            state = f"{len(self.rounds)} rounds"
        return f"Run({str(self.path)!r}: {state})"

    def __fspath__(self) -> str:
        return str(self.path)

    def __eq__(self, other) -> bool:
        return isinstance(other, Run) and self.path == other.path

    def __hash__(self) -> int:
        return hash(self.path)

    # ---- what the run holds
    @property
    def exists(self) -> bool:
        """A run was started here (its config was written)."""
        return (self.path / self.CONFIG).is_file()

    @property
    def is_iterate(self) -> bool:
        return (self.path / self.ROUNDS).is_dir() or (self.path / self.ITERATE).is_file()

    @property
    def config_text(self) -> str:
        path = self.path / self.CONFIG
        return path.read_text() if path.is_file() else ""

    @property
    def kind(self) -> str:
        """What the run trained: train (a policy), rm (a reward model) or iterate (rounds)."""
        if self.is_iterate:
            return "iterate"
        import yaml

        raw = yaml.safe_load(self.config_text) or {}
        losses = (raw.get("loss") or {}).get("type") or []
        return "rm" if "bradley_terry" in ([losses] if isinstance(losses, str) else losses) else "train"

    @property
    def config(self) -> Config:
        """The run's resolved config, checked as the config of what it trained (Run.kind)."""
        from dpokit.config import load_config

        if not self.exists:
            raise UsageError(f"{self.path}: holds no run (no {self.CONFIG})")
        return load_config(self.path / self.CONFIG, command=self.kind)

    @property
    def metrics(self) -> list[dict]:
        """Every record of the metrics file, step 0 (the evaluation before training) included."""
        return self._jsonl(self.METRICS)

    @property
    def history(self) -> list[dict]:
        """The optimizer steps' records (step >= 1)."""
        return [r for r in self.metrics if r["step"] > 0]

    @property
    def pair_samples(self) -> list[dict]:
        return self._jsonl(self.PAIR_SAMPLES)

    @property
    def summary(self) -> dict | None:
        return read_json(self.path / self.SUMMARY)

    @property
    def data_stats(self) -> dict | None:
        return read_json(self.path / self.DATA_STATS)

    @property
    def data_check(self) -> dict | None:
        return read_json(self.path / self.DATA_CHECK)

    @property
    def eval_results(self) -> dict | None:
        return read_json(self.path / self.EVAL)

    @property
    def eval_samples(self) -> list[dict]:
        return self._jsonl(self.EVAL_SAMPLES)

    @property
    def frontier(self) -> list[dict] | None:
        return read_json(self.path / self.FRONTIER)

    def _jsonl(self, name: str) -> list[dict]:
        path = self.path / name
        return read_jsonl(path) if path.is_file() else []

    # ---- checkpoints
    @property
    def checkpoint_root(self) -> Path:
        return self.path / self.CHECKPOINTS

    def checkpoint_path(self, name: str) -> Path:
        """The folder of checkpoint `name` (step-N, best, step-N-last-good)."""
        return self.checkpoint_root / name

    def step_checkpoint(self, step: int) -> Path:
        return self.checkpoint_path(f"step-{step}")

    def scratch(self, name: str) -> Path:
        """A hidden folder beside the checkpoints, for files a checkpoint takes in once complete."""
        return self.checkpoint_root / f".{name}"

    def mark_latest(self, folder: Path) -> None:
        (self.checkpoint_root / self.LATEST).write_text(Path(folder).name + "\n")

    @property
    def checkpoints(self) -> list[Path]:
        """The step-N checkpoints, oldest first (temp folders of an interrupted save are not listed)."""
        if not self.checkpoint_root.is_dir():
            return []
        found = [
            (int(m.group(1)), d) for d in self.checkpoint_root.iterdir() if (m := STEP_DIR.match(d.name))
        ]
        return [d for _, d in sorted(found)]

    @property
    def latest_checkpoint(self) -> Path | None:
        """The newest resumable step-N checkpoint."""
        resumable = [d for d in self.checkpoints if all((d / f).is_file() for f in RESUMABLE)]
        return resumable[-1] if resumable else None

    @property
    def best_checkpoint(self) -> Path | None:
        best = self.checkpoint_path(self.BEST)
        return best if best.is_dir() else None

    @property
    def final_checkpoint(self) -> Path | None:
        """The checkpoint the run ended with (its summary), else its newest resumable step-N."""
        ckpt = (self.summary or {}).get("checkpoint")
        if ckpt and (self.path / ckpt).is_dir():  # relative to the run dir: a run dir can move
            return self.path / ckpt
        return self.latest_checkpoint

    def relative(self, folder: Path | None) -> str | None:
        """A folder of the run as the summary records it: relative to the run dir."""
        return None if folder is None else str(Path(folder).relative_to(self.path))

    def checkpoint(self, which: str | int | Path | None = None) -> Path:
        """A checkpoint to load: None = the final one, `best`, `latest`, a step number, a folder name, or a
        folder (a Path) that holds weights of this run (a round pulled back by iterate.kl_budget)."""
        if isinstance(which, Path):
            found = which
        elif which is None:
            found = self.final_checkpoint
        elif which == "latest":
            found = self.latest_checkpoint
        elif isinstance(which, int):
            found = self.step_checkpoint(which)
        else:
            found = self.checkpoint_path(str(which))
        if found is None or not found.is_dir():
            held = ", ".join(d.name for d in self.checkpoints) or "none"
            raise UsageError(
                f"{self.path}: no checkpoint {which or 'to load'} (step checkpoints held: {held}); "
                "was the run saved (train.save_final, train.checkpoint_every)?"
            )
        return found

    @staticmethod
    def checkpoint_step(folder: Path) -> int | None:
        """The optimizer step a checkpoint holds (its dpokit state), None for a folder dpokit did not write."""
        state = read_json(Path(folder) / "dpokit_state.json")
        return state["step"] if state else None

    def figures_at(self, step: int) -> dict | None:
        """The metrics record of `step` (the last one logged at or before it): what a checkpoint's card shows."""
        logged = [r for r in self.history if r["step"] <= step]
        return logged[-1] if logged else None

    @staticmethod
    def of_checkpoint(folder: Path) -> Run | None:
        """The run a checkpoint folder (RUN/checkpoints/NAME) belongs to, when it lies in one."""
        run = Run(Path(folder).parent.parent)
        return run if Path(folder).parent.name == Run.CHECKPOINTS and run.exists else None

    # ---- starting, and what a training run writes (rank 0)
    def check(self, resume: bool, overwrite: bool) -> None:
        """Refuse an unusable run dir before anything is loaded or written: nothing to resume, a finished
        run in the way, a file where a folder should be."""
        where = f"train.run_dir={str(self.path)!r}"
        if resume:
            if not self.path.is_dir():
                raise TrainingError(
                    f"train.resume=true: {str(self.path)!r}: no such folder; check train.run_dir"
                )
            if not self.exists:
                raise TrainingError(
                    f"train.resume=true: {str(self.path)!r} holds no run ({self.CONFIG}); check train.run_dir"
                )
        elif (self.path / self.METRICS).exists() and not overwrite:
            raise TrainingError(
                f"{where} already holds a run ({self.METRICS}). Fix: choose another run_dir or set "
                "train.overwrite=true."
            )
        existing = _nearest_existing(self.path)
        if not existing.is_dir():
            raise TrainingError(f"{where} is not writable: {existing} is a file")
        try:  # a read-only or pseudo file system says so here, before any data or model loads
            fd, probe = tempfile.mkstemp(prefix=".dpokit-write-check-", dir=existing)
            os.close(fd)
            os.unlink(probe)
        except OSError as err:
            raise TrainingError(
                f"{where} cannot be written: {existing} ({err.strerror}). Fix: choose a run_dir on a writable disk"
            ) from None

    def check_space(self, needed: int) -> None:
        """Refuse to start when the disk cannot hold `needed` bytes (one checkpoint)."""
        free = shutil.disk_usage(_nearest_existing(self.path)).free
        if free < needed:
            raise TrainingError(
                f"train.run_dir={str(self.path)!r}: {free / 2**20:.0f} MiB free on its disk, a checkpoint needs "
                f"about {needed / 2**20:.0f} MiB. Fix: free space or choose a run_dir on another disk."
            )

    def start(self, cfg: Config, data_stats: dict, data: dict[str, list] | None = None) -> None:
        """A new run: the old run's logs gone, the config, the data stats and the data given in memory
        (`data`: name -> records, saved as RUN/data/NAME.jsonl, where the config points)."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            for stale in self.STALE:
                (self.path / stale).unlink(missing_ok=True)
            for name, records in (data or {}).items():
                self.data_file(name).parent.mkdir(exist_ok=True)
                write_jsonl(self.data_file(name), records, atomic=True)
            self.write_config(dump_yaml(cfg))
            write_json(self.path / self.DATA_STATS, data_stats)
        except OSError as err:
            raise TrainingError(f"train.run_dir={str(self.path)!r} is not writable: {err}") from err

    def write_config(self, text: str) -> None:
        (self.path / self.CONFIG).write_text(text)

    def data_file(self, name: str) -> Path:
        """RUN/data/NAME.jsonl: in-memory data saved with the run (the API), or the demo's sampled pairs."""
        return self.path / self.DATA / f"{name}.jsonl"

    def append_metrics(self, record: dict) -> None:
        with open(self.path / self.METRICS, "a", encoding="utf-8") as fh:
            fh.write(to_json_line(record))

    def append_pair_samples(self, step: int, pairs: list[dict]) -> None:
        with open(self.path / self.PAIR_SAMPLES, "a", encoding="utf-8") as fh:
            fh.write(to_json_line({"step": step, "pairs": pairs}))

    def forget_after(self, step: int) -> None:
        """A resumed run forgets what was logged after its checkpoint's step."""
        for name in (self.METRICS, self.PAIR_SAMPLES):
            write_jsonl(self.path / name, [r for r in self._jsonl(name) if r["step"] <= step], atomic=True)

    def write_summary(self, summary: dict) -> None:
        write_json(self.path / self.SUMMARY, summary)

    # ---- evaluation, the demo, the report
    def write_eval(self, results: dict, samples: list[dict] | None = None) -> Path:
        """eval.json (+ eval_samples.jsonl): what `dpokit report` shows."""
        self.path.mkdir(parents=True, exist_ok=True)
        write_json(self.path / self.EVAL, results)
        if samples is not None:
            write_jsonl(self.path / self.EVAL_SAMPLES, samples)
        return self.path / self.EVAL

    def write_data_check(self, report: dict) -> None:
        write_json(self.path / self.DATA_CHECK, report)

    def write_frontier(self, points: list[dict]) -> None:
        write_json(self.path / self.FRONTIER, points)

    def sweep(self, name: str) -> Run:
        """The demo sweep's run NAME (RUN/sweep/NAME)."""
        return Run(self.path / self.SWEEP / name)

    @property
    def report_path(self) -> Path:
        return self.path / self.REPORT

    def report(self, out=None) -> Path:
        """Write the run's HTML report (RUN/report.html, or `out`); returns its path."""
        from dpokit.report import write_report

        return write_report(self.path, out)

    @property
    def reward_model_path(self) -> Path:
        """RUN/reward_model: a reward-model run's result, a plain sequence-classification folder (LoRA merged)
        that `model:PATH` rewards and transformers load."""
        return self.path / self.REWARD_MODEL

    # ---- loading what was trained
    def load(self, checkpoint: str | int | None = None, reference: bool | str = False, device=None):
        """The trained policy (+ tokenizer, + its reference on request): see `dpokit.load`."""
        from dpokit.trained import load_trained

        return load_trained(self, checkpoint=checkpoint, reference=reference, device=device)

    # ---- iterate runs
    @property
    def rounds(self) -> list[Round]:
        """The rounds started so far, in order."""
        root = self.path / self.ROUNDS
        if not root.is_dir():
            return []
        return [
            Round(self, int(d.name))
            for d in sorted(root.iterdir(), key=lambda d: int(d.name))
            if d.name.isdigit()
        ]

    def round(self, r: int) -> Round:
        return Round(self, r)

    @property
    def labels(self) -> Path:
        """The folder of an iterate run's labeling database (iterate.judge=human; labels/store.py)."""
        return self.path / "labels"

    @property
    def iterate_summary(self) -> dict | None:
        """iterate.json: every finished round's summary."""
        return read_json(self.path / self.ITERATE)

    def write_iterate_summary(self, rounds: list[dict]) -> None:
        write_json(self.path / self.ITERATE, {"rounds": rounds}, atomic=True)

    @property
    def initial_samples(self) -> list[dict] | None:
        """The initial model's held-out completions, sampled once for every round's evaluation."""
        path = self.path / self.INITIAL_SAMPLES
        return read_jsonl(path) if path.is_file() else None

    def write_initial_samples(self, records: list[dict]) -> None:
        write_jsonl(self.path / self.INITIAL_SAMPLES, records, atomic=True)


class Round:
    """Round r of an iterate run: RUN/rounds/R/. Each phase writes its file atomically; `summary` (round.json)
    is written last and marks the round done."""

    SAMPLES = "samples.jsonl"
    SCORES = "scores.jsonl"
    PAIRS = "pairs.jsonl"
    PAIR_STATS = "pair_stats.json"
    TRAIN = "train"
    EVAL = Run.EVAL
    EVAL_SAMPLES = Run.EVAL_SAMPLES
    KL_BUDGET = "kl_budget.json"
    PULLED = "kl_budget"
    SUMMARY = "round.json"

    def __init__(self, run: Run, r: int):
        self.run, self.number = run, r
        self.path = run.path / Run.ROUNDS / str(r)

    def __repr__(self) -> str:
        return f"Round({self.number} of {str(self.run.path)!r}{'' if self.done else ', unfinished'})"

    @property
    def done(self) -> bool:
        return (self.path / self.SUMMARY).is_file()

    @property
    def train(self) -> Run:
        """The round's training run."""
        return Run(self.path / self.TRAIN)

    @property
    def pulled_path(self) -> Path:
        """The weights iterate.kl_budget pulled the round back to (a checkpoint folder of its training run's
        config), written before `kl_budget` (the record of the pull) marks that phase done."""
        return self.path / self.PULLED

    @property
    def policy_checkpoint(self) -> Path:
        """The weights the round ended with: its training's final checkpoint, or where kl_budget pulled it."""
        record = self.read("kl_budget")
        return self.pulled_path if record and record["pulled"] else self.train.checkpoint()

    @property
    def frontier(self) -> Run:
        """The demo sweep's held-out measure of this round's policy (RUN/rounds/R/frontier: eval results)."""
        return Run(self.path / "frontier")

    def frontier_at(self, lam: float) -> Run:
        """The demo sweep's held-out measure of this round's policy interpolated at `lam` toward its start."""
        return Run(self.path / f"frontier-lambda-{lam:g}")

    @property
    def pairs_path(self) -> Path:
        """The round's pairs, a preference file its training reads."""
        return self.path / self.PAIRS

    def read(self, phase: str):
        """A finished phase's output (samples, scores, pairs, pair_stats, eval, eval_samples, summary), or
        None before the phase ends."""
        name = getattr(self, phase.upper())
        path = self.path / name
        if not path.is_file():
            return None
        return read_jsonl(path) if name.endswith(".jsonl") else read_json(path)

    def write(self, phase: str, value) -> None:
        """A phase's output, whole or absent."""
        name = getattr(self, phase.upper())
        self.path.mkdir(parents=True, exist_ok=True)
        if name.endswith(".jsonl"):
            write_jsonl(self.path / name, value, atomic=True)
        else:
            write_json(self.path / name, value, atomic=True)

    @property
    def summary(self) -> dict | None:
        return self.read("summary")

    def load(self, reference: bool | str = False, device=None):
        """The policy this round ended with (`policy_checkpoint`)."""
        return self.train.load(self.policy_checkpoint, reference=reference, device=device)
