"""The public Python API: what `import dpokit` offers, and what the `dpokit` command calls.

    run = dpokit.train("configs/tiny.yaml", data=records, **{"train.lr": 1e-4})
    run.metrics[-1]["rewards/margins"];  policy = run.load();  policy.generate("Write a haiku")

Every function takes plain Python values (paths, dicts, lists of records, `datasets.Dataset`, callables),
returns an object, and raises `dpokit.DpokitError` (with the message the CLI prints) for anything the user
can fix; none of them exits the process. A config is a YAML path, a dict or a `Config`; overrides are
dotted keys (`**{"train.lr": 1e-5}`) or sections (`train={"lr": 1e-5}`, `model="NAME"`), applied last.
Data given in memory is checked as a file would be (errors name `data:row N` and the field) and saved
into the run dir, where the run's config points: a run is whole on disk and resumes like any other.

This module imports nothing heavy at import time: `import dpokit` does not load torch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from dpokit.config import Config, build_config, config_source, did_you_mean, merge, nested
from dpokit.errors import UsageError
from dpokit.rundir import Run, is_main_process, with_run_dir


def _is_path(value) -> bool:
    """A file or folder given by name (else: data in memory)."""
    return isinstance(value, (str, Path, Run))


def _merged(config, overrides: dict, resume) -> tuple[dict, list[str]]:
    """The config source with the overrides on top, as a nested dict, and the overrides' problems (said with
    every other problem of the config); `resume`: a run dir whose own config continues (a config may not be
    given too)."""
    if resume is not None:
        run = resume if isinstance(resume, Run) else Run(resume)
        if config is not None:
            raise UsageError(
                f"resume={str(run.path)!r} continues the run with its own config; a config cannot be given too "
                f"(got {config}). To change a setting, give it as an override, e.g. train.max_steps=200"
            )
        if not run.path.is_dir():
            raise UsageError(f"resume={str(run.path)!r}: no such folder")
        if not run.exists:
            raise UsageError(
                f"resume={str(run.path)!r}: holds no run (no {Run.CONFIG}); a run that failed to start leaves none"
            )
        config = run.path / Run.CONFIG
        overrides = {**overrides, "train.resume": True, "train.run_dir": str(run.path)}
    problems: list[str] = []
    data = merge(config_source(config), nested(overrides, problems))
    return data, problems


def config(config=None, command: str = "train", **overrides) -> Config:
    """A checked Config from a YAML path, a dict or a Config, with overrides on top (every problem at once:
    ConfigError). `command`: train, or iterate (whose data comes from its rounds)."""
    data, problems = _merged(config, overrides, None)
    return build_config(_reward_loss(data, command), command, problems)


def _reward_loss(data: dict, command: str) -> dict:
    """A reward model's config trains with bradley_terry unless it names a loss (then checked)."""
    if command == "rm" and "type" not in data.get("loss", {}):
        _set(data, "loss.type", ["bradley_terry"])
    return data


def _set(data: dict, key: str, value) -> None:
    section, name = key.split(".")
    data.setdefault(section, {})[name] = value


def _with_run_dir(data: dict, prefix: str = "") -> Path:
    """train.run_dir of a nested config dict, filled in (runs/<prefix><time>) when empty."""
    run_dir = data.get("train", {}).get("run_dir") or ""
    if not run_dir:
        run_dir = with_run_dir(Config(), prefix).train.run_dir
        _set(data, "train.run_dir", run_dir)
    return Path(run_dir)


def _training_data(data, eval_data) -> tuple[dict, dict]:
    """(config keys, records in memory by split) of `data` / `eval_data`: a path names a file; a list, a
    Dataset or a DatasetDict (its train split, and its test/validation/eval split unless eval_data is
    given) is read in memory."""
    from dpokit.data import in_memory

    if data is not None and hasattr(data, "keys") and hasattr(data, "column_names"):  # DatasetDict
        splits = dict(data)
        if "train" not in splits:
            raise UsageError(f"data: a DatasetDict without a 'train' split (splits: {list(splits)})")
        held = next((splits[k] for k in ("test", "validation", "eval") if k in splits), None)
        data, eval_data = splits["train"], eval_data if eval_data is not None else held
    keys, given = {}, {}
    for name, key, value in (("train", "data.train", data), ("eval", "data.eval", eval_data)):
        if value is None:
            continue
        if _is_path(value):
            keys[key] = str(Path(value))
        else:
            given[name] = in_memory(value, "data" if name == "train" else "eval_data")
    return keys, given


def train(
    config=None,
    *,
    data=None,
    eval_data=None,
    resume=None,
    callbacks: Sequence[Callable[[dict], object]] = (),
    trackers: list | None = None,
    **overrides,
) -> Run:
    """Train a policy; returns its run (`run.metrics`, `run.summary`, `run.load()`, `run.report()`).

    `data` / `eval_data`: a preference file, a list of records or a `datasets.Dataset` / `DatasetDict`, in
    any format dpokit reads (they set data.train / data.eval); a dict is the data section's settings.
    `resume`: continue that run dir from its latest checkpoint, to the same result, on the data it saved
    (overrides may follow). `callbacks`: functions called with each
    optimizer step's metrics record; one that returns something true stops the run after that step (it
    saves its final checkpoint as usual). `trackers`: Accelerate GeneralTracker objects for live metrics."""
    from dpokit.loop import train as run_training

    cfg, given = _train_config(config, overrides, resume, data, eval_data)
    return run_training(cfg, trackers=trackers, callbacks=callbacks, given=given).run


def _train_config(
    config, overrides: dict, resume, data, eval_data, command: str = "train"
) -> tuple[Config, dict]:
    if isinstance(data, dict) and not hasattr(data, "column_names"):  # the data section, not a DatasetDict
        overrides, data = {**overrides, "data": data}, None
    if resume is not None and (data is not None or eval_data is not None):
        raise UsageError(
            f"resume={str(resume)!r} continues the run on the data it trained on (its config names it); "
            "data / eval_data cannot be given too"
        )
    raw, problems = _merged(config, overrides, resume)
    keys, given = _training_data(data, eval_data)
    for key, value in keys.items():
        _set(raw, key, value)
    run = Run(_with_run_dir(raw))
    for name in given:
        _set(raw, f"data.{name}", str(run.data_file(name)))
    return build_config(_reward_loss(raw, command), command, problems), given


def train_rm(
    config=None,
    *,
    data=None,
    eval_data=None,
    resume=None,
    callbacks: Sequence[Callable[[dict], object]] = (),
    **overrides,
) -> Run:
    """Train a reward model on preference pairs: the Bradley-Terry loss (loss.center_rewards_coefficient,
    a per-pair `margin` column) on a one-output score head read at each completion's last token, with the
    data, layouts, LoRA or full fine-tuning, checkpoints and resume of `train`. Held-out `eval/rewards/
    accuracies` is its pair accuracy. The result, RUN/reward_model, is a plain sequence-classification
    folder (LoRA merged in): `model:RUN` (or `model:RUN/reward_model`) as a reward in `iterate` and `eval`,
    and `AutoModelForSequenceClassification.from_pretrained`."""
    from dpokit.loop import train as run_training

    cfg, given = _train_config(config, overrides, resume, data, eval_data, "rm")
    run = run_training(cfg, callbacks=callbacks, given=given).run
    done = run.summary and run.summary.get("checkpoint")
    if done and is_main_process() and not run.reward_model_path.exists():
        export_reward_model(run)
    return run


def export_reward_model(run: Run) -> Path:
    """RUN/reward_model from a reward-model run's final checkpoint (LoRA merged into the transformer)."""
    from dpokit.files import build_folder
    from dpokit.trained import load_trained

    trained = load_trained(run, device="cpu")
    model = trained.merged()

    def save(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        trained.tokenizer.save_pretrained(tmp)

    build_folder(run.reward_model_path, save, "config.json")
    return run.reward_model_path


def precompute_ref(config=None, *, data=None, eval_data=None, **overrides) -> dict | None:
    """Compute the reference log-probs of a training config once and cache them on disk (what a run with
    train.precompute_ref=true reads); returns the counts and the cache folder, None when the loss uses no
    reference."""
    from dpokit.loop import precompute_reference

    cfg, given = _train_config(config, overrides, None, data, eval_data)
    return precompute_reference(cfg, given)


@dataclass
class EvalSettings:
    """How `evaluate` samples and scores (`dpokit eval` flags of the same names)."""

    num_prompts: int = 64
    """Prompts to sample on (0 = all)."""
    samples: int = 2
    """Completions per prompt from each model."""
    max_new_tokens: int = 48
    """Most tokens sampled per completion."""
    temperature: float = 1.0
    """Sampling temperature (0 = greedy)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest token set of this probability."""
    batch_size: int = 32
    """Sequences per generation batch / pairs per scoring batch."""
    max_length: int = 1024
    """Most tokens of prompt + completion when scoring preference data."""
    max_prompt_length: int = 512
    """Most prompt tokens when scoring preference data."""
    seed: int = 0
    """Sampling seed."""
    bf16: bool | None = None
    """bf16 autocast (default: as trained)."""


@dataclass
class Evaluation:
    """What `evaluate` measured: `preference` (accuracy, margins, KL on pairs) and/or `generation` (reward,
    win rate, KL of sampled completions), the per-prompt samples, and the eval.json it wrote (or None)."""

    results: dict
    samples: list[dict] | None = field(default=None, repr=False)
    path: Path | None = None

    @property
    def preference(self) -> dict | None:
        return self.results.get("preference")

    @property
    def generation(self) -> dict | None:
        return self.results.get("generation")

    @property
    def interpolation(self) -> list[dict] | None:
        """One entry per lambda (`lambdas=`): {"lambda", "generation" and/or "preference"}."""
        return self.results.get("interpolation")

    def text(self, width: int = 110) -> str:
        """The figures as `dpokit eval` prints them: a table (and one row per lambda)."""
        import io

        from rich.console import Console
        from rich.table import Table

        r = self.results
        table = Table(title=f"{r['target']} against {r['reference']}", show_header=False)
        table.add_column("what", style="bold")
        table.add_column("value")
        p = self.preference
        if p:
            table.add_row("pairs", f"{p['pairs']} ({r.get('data', '')})")
            for key in (
                "loss",
                "rewards/accuracies",
                "rewards/margins",
                "rewards/chosen",
                "rewards/rejected",
            ):
                if key in p:
                    table.add_row(key, f"{p[key]:.4f}")
            if "drift/kl_chosen_per_token" in p:
                table.add_row("KL per token (chosen)", f"{p['drift/kl_chosen_per_token']:.4f}")
        g = self.generation
        if g:
            table.add_row(
                "sampled", f"{g['prompts']} prompts x {g['samples_per_prompt']}, reward {r.get('reward')}"
            )
            table.add_row(
                "reward policy / reference",
                f"{g['reward/policy']:.4f} ± {g['reward/policy_stderr']:.4f} / "
                f"{g['reward/reference']:.4f} ± {g['reward/reference_stderr']:.4f}",
            )
            table.add_row("win rate over the reference", f"{g['win_rate']:.3f}")
            table.add_row(
                "KL(policy || reference)",
                f"{g['kl/sequence']:.3f} ± {g['kl/sequence_stderr']:.3f} nats per completion, {g['kl/token']:.4f} per token",
            )
            table.add_row(
                "tokens policy / reference", f"{g['length/policy']:.1f} / {g['length/reference']:.1f}"
            )
        buffer = io.StringIO()
        console = Console(file=buffer, width=width, force_terminal=False, color_system=None)
        console.print(table)
        if r.get("interpolation"):
            console.print(_interpolation_table(r["interpolation"], r.get("reward")))
        return buffer.getvalue()


def _interpolation_table(points: list[dict], reward):
    """One row per lambda of `evaluate(lambdas=...)`."""
    from rich.table import Table

    table = Table(title=f"between the start (lambda 0) and as trained (1); reward {reward}")
    generation, preference = "generation" in points[0], "preference" in points[0]
    table.add_column("lambda", justify="right")
    if generation:
        for name in ("reward", "win rate", "KL (nats)", "tokens"):
            table.add_column(name, justify="right")
    if preference:
        for name in ("pair accuracy", "margin"):
            table.add_column(name, justify="right")
    for point in points:
        row = [f"{point['lambda']:g}"]
        if generation:
            g = point["generation"]
            row += [
                f"{g['reward/policy']:.4f}",
                f"{g['win_rate']:.3f}",
                f"{g['kl/sequence']:.3f}",
                f"{g['length/policy']:.1f}",
            ]
        if preference:
            p = point["preference"]
            row += [f"{p['rewards/accuracies']:.4f}", f"{p['rewards/margins']:.4f}"]
        table.add_row(*row)
    return table


def evaluate(
    target,
    *,
    data=None,
    prompts=None,
    reward=None,
    ref: str | None = None,
    split: str | None = None,
    out=None,
    lambdas=None,
    **settings,
) -> Evaluation:
    """Held-out preference metrics on `data` (pairs: a file, records or a Dataset), and/or the reward, win
    rate and KL of completions sampled on `prompts` (a file, or a list of texts / chat messages; default: the
    prompts of `data`) from the policy and from its reference, scored by `reward` (a spec such as `vader` or
    `model:PATH`, or a Python function `fn(prompts, completions) -> list[float]`).

    `target`: a run (its final checkpoint, against the reference it trained with) or a model (with `ref`).
    `lambdas` (e.g. [0.25, 0.5, 1]): measure the policy at each point between where its training started
    (0) and as trained (1), `Trained.interpolate` (WARP's LITI): results["interpolation"], one entry per
    lambda, every one against the same reference samples (a reward-KL curve for the price of sampling).
    Writes eval.json (+ eval_samples.jsonl) to `out`, else into the run dir (nothing for a model target
    without `out`). `settings`: the fields of EvalSettings. Everything is checked before a model loads."""
    from dpokit.evaluation import generation_metrics, preference_metrics
    from dpokit.generate import SamplingSettings, sample
    from dpokit.rewards import python_spec
    from dpokit.trained import load_trained

    opts = _settings(EvalSettings, settings, "evaluate")
    points = _lambdas(lambdas)
    pairs, scorer, prompt_list = _eval_inputs(data, prompts, reward, split, opts.num_prompts)
    trained = load_trained(target, reference=ref or True, bf16=opts.bf16)
    results: dict = {"target": trained.source, "reference": ref or "the run's starting model"}
    if trained.checkpoint is not None:  # which weights were measured (an unfinished run: its newest step)
        results |= {"checkpoint": str(trained.checkpoint), "step": Run.checkpoint_step(trained.checkpoint)}
    if data is not None:
        results["data"] = str(data) if pairs is None else f"{len(pairs.records)} records in memory"
    if scorer is not None:
        results["reward"] = python_spec(reward) if callable(reward) else reward
    sampling = SamplingSettings(
        opts.max_new_tokens, opts.temperature, opts.top_p, opts.batch_size, opts.seed, trained.bf16
    )
    reference_samples = None
    if scorer is not None and points:  # drawn once: every lambda is compared on the same samples
        with trained.reference.module() as ref_model:
            reference_samples = sample(
                ref_model, trained.tokenizer, prompt_list, opts.samples, sampling, label="reference samples"
            )
    records, measured = [], []
    for lam in points or [None]:
        if lam is not None:
            trained.interpolate(lam)
        point, point_records = {}, None
        if data is not None:
            point["preference"] = preference_metrics(
                trained, pairs or str(data), opts.max_length, opts.max_prompt_length, opts.batch_size
            )
        if scorer is not None:
            point["generation"], point_records = generation_metrics(
                trained, prompt_list, scorer, opts.samples, sampling, reference_samples
            )
            records += [{"lambda": lam, **rec} if lam is not None else rec for rec in point_records]
        measured.append({"lambda": lam, **point} if lam is not None else point)
    if points:
        results["interpolation"] = measured
    else:
        results |= measured[0]
    records = records if scorer is not None else None
    folder = Path(out) if out is not None else (Path(target) if Run(target).exists else None)
    path = Run(folder).write_eval(results, records) if folder is not None else None
    return Evaluation(results, records, path)


def _lambdas(lambdas) -> list[float]:
    """evaluate's lambdas: a list of numbers or a comma-separated text ("0.25,0.5,1"), each 0 or more."""
    if lambdas is None or lambdas == "":
        return []
    items = lambdas.split(",") if isinstance(lambdas, str) else list(lambdas)
    try:
        values = [float(x) for x in items]
    except (TypeError, ValueError):
        raise UsageError(
            f"lambdas={lambdas!r}: give numbers between 0 (the start) and 1 (as trained), e.g. 0.25,0.5,1"
        ) from None
    if not values or any(not v >= 0 for v in values):
        raise UsageError(f"lambdas={lambdas!r}: each must be 0 or more (0 = the start, 1 = as trained)")
    return values


def _eval_inputs(data, prompts, reward, split: str | None, num_prompts: int):
    """(pairs in memory or None, the reward, the prompts to sample on) of `evaluate`, checked before any
    model loads."""
    from dpokit.data import in_memory, resolve_data_path
    from dpokit.data.prompts import load_prompts, prompts_in_memory
    from dpokit.errors import DataError
    from dpokit.rewards import as_reward

    if data is None and reward is None:
        raise UsageError("nothing to evaluate: give data (preference pairs) and/or a reward (with prompts)")
    if reward is not None and prompts is None and data is None:
        raise UsageError("a reward needs prompts: give prompts (or data)")
    pairs = None if data is None or _is_path(data) else in_memory(data, "data")
    if data is not None and pairs is None and not resolve_data_path(str(data)).exists():
        raise DataError(str(data), "no such file (given as --data)")
    if reward is None:
        return pairs, None, None
    if prompts is not None:
        source = str(prompts) if _is_path(prompts) else prompts_in_memory(prompts, "prompts")
        return pairs, as_reward(reward), load_prompts(source, split, num_prompts, "--prompts")
    return pairs, as_reward(reward), load_prompts(pairs or str(data), split, num_prompts, "--data")


def _settings(cls, given: dict, who: str):
    """`cls` (a dataclass of settings) from keyword arguments; unknown names are a UsageError."""
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in given if k not in names]
    if unknown:
        raise UsageError(
            f"{who}: unknown setting {unknown[0]!r}{did_you_mean(unknown[0], names)}; valid: {', '.join(names)}"
        )
    return cls(**given)


def iterate(
    config=None,
    *,
    prompts=None,
    eval_prompts=None,
    reward=None,
    judge=None,
    resume=None,
    callbacks: Sequence[Callable[[dict], object]] = (),
    **overrides,
) -> Run:
    """On-policy rounds (sample K completions per prompt, score, pair best against worst, train, evaluate),
    or the continuation of a stopped iterate run; returns its run (`run.rounds`, each with its `summary`,
    its training run `train` and `load()`).

    `prompts` / `eval_prompts`: files, or lists of texts / chat messages / records with a `prompt` (they set
    iterate.prompts / iterate.eval_prompts, saved into the run dir). `reward`: a spec or a Python function
    `fn(prompts, completions) -> list[float]`; `judge`: a spec or `fn(prompt, a, b) -> P(a better)`. A run
    given Python functions records their names; continuing it needs them given again. `callbacks`: as for
    `train`, called during each round's training."""
    from dpokit.data.prompts import prompts_in_memory
    from dpokit.rewards import python_spec
    from dpokit.rounds import run_iterate

    raw, problems = _merged(config, overrides, resume)
    root = Run(_with_run_dir(raw, "iterate-"))
    given: dict = {"callbacks": list(callbacks)}
    if isinstance(config, (str, Path)):  # a module:function next to the config file imports from there
        given["near"] = (Path(config).resolve().parent,)
    for name, value in (("prompts", prompts), ("eval_prompts", eval_prompts)):
        if value is None:
            continue
        if _is_path(value):
            _set(raw, f"iterate.{name}", str(Path(value)))
        else:
            given[name] = prompts_in_memory(value, name)
            _set(raw, f"iterate.{name}", str(root.data_file(name)))
    for name, value in (("reward", reward), ("judge", judge)):
        if value is not None:
            _set(raw, f"iterate.{name}", python_spec(value) if callable(value) else value)
            if callable(value):
                given[name] = value
    run_iterate(build_config(raw, "iterate", problems), **given)
    return root


def export(target, out, *, dtype: str = "fp32", gguf=None, gguf_type: str = "f16", lam: float = 1.0):
    """A run's policy (its final checkpoint, or a checkpoint folder) as a plain Hugging Face folder at `out`
    (LoRA merged in; weights in fp32, bf16 or fp16), and a GGUF file + Ollama Modelfile when `gguf` names
    one (f32, f16, bf16, q8_0, q4_1). `lam` < 1: the policy interpolated toward where its training started
    (`evaluate(lambdas=...)` measures the choices). Returns what was written (folder, gguf, modelfile,
    seconds)."""
    from dpokit.exporter import export as run_export

    (lam,) = _lambdas([lam])
    return run_export(target, str(out), dtype, str(gguf) if gguf else None, gguf_type, lam)


def check(
    data,
    *,
    model: str | None = None,
    max_length: int | None = None,
    max_prompt_length: int | None = None,
    similarity_threshold: float = 0.9,
):
    """The known DPO failure modes of preference data (a file, records or a Dataset): invalid records,
    duplicates, chosen == rejected, similarity, length bias, annotator agreement, scores, and truncation
    (with `model`, whose tokenizer counts tokens). Returns a DataReport (a dict with `advice`, `valid`,
    `text()`)."""
    from dpokit.data import in_memory
    from dpokit.data.check import check_file

    if (max_length or max_prompt_length) and not model:
        raise UsageError(
            "max_length / max_prompt_length (--max-length / --max-prompt-length) count truncation in the "
            "model's tokens: give model too (--model)"
        )
    source = str(data) if _is_path(data) else in_memory(data, "data")
    return check_file(source, _tokenizer(model), max_length, max_prompt_length, similarity_threshold)


def filter(data, out=None, *, model: str | None = None, seed: int = 0, **filters):  # noqa: A001 - `dpokit data filter`
    """The pairs of `data` (a file, records or a Dataset) that pass the filters, the data.* keys of training
    with the same defaults (deduplicate, drop_identical, max_similarity, min_agreement, min_score_gap,
    min_confidence, rebalance_length, skip_invalid); every record is kept or counted by reason. Returns a
    FilterResult (`rows`: the kept pairs as records, `kept`, `dropped`); `out`: also write them as JSONL."""
    from dpokit.data import in_memory
    from dpokit.data.filters import filter_records
    from dpokit.files import write_jsonl

    names = FILTERS
    unknown = [k for k in filters if k not in names]
    if unknown:
        raise UsageError(
            f"filter: unknown filter {unknown[0]!r}{did_you_mean(unknown[0], names)}; valid: {', '.join(names)}"
        )
    settings = build_config({"data": {"train": "-", **filters}}).data
    source = str(data) if _is_path(data) else in_memory(data, "data")
    result = filter_records(source, settings, _tokenizer(model), seed)
    if out is not None:
        write_jsonl(Path(out), result.rows)
    return result


def split(
    data,
    out,
    *,
    parts="train=0.8,heldout=0.2",
    seed: int = 0,
    skip_invalid: bool = False,
    chat: bool = False,
) -> dict:
    """Split preference data (a file, records or a Dataset) by prompt into parts (a dict NAME -> share, or
    "NAME=SHARE,..."), no prompt in two parts; writes OUT/NAME.jsonl each; returns NAME -> (prompts, pairs).
    The parts of one file: reward-model pairs, round prompts and held-out prompts that never overlap.
    `chat`: Anthropic HH transcripts ("\n\nHuman: ...\n\nAssistant:") written as chat messages, for a
    chat model to see them through its chat template."""
    from dpokit.data import in_memory
    from dpokit.data.filters import split_file

    shares = _parts(parts)
    source = str(data) if _is_path(data) else in_memory(data, "data")
    return split_file(source, Path(out), shares, seed, skip_invalid, chat)


def _parts(parts) -> dict[str, float]:
    if isinstance(parts, dict):
        shares = dict(parts)
    else:
        shares = {}
        for item in str(parts).split(","):
            name, _, share = item.partition("=")
            try:
                shares[name.strip()] = float(share)
            except ValueError:
                raise UsageError(
                    f"parts={parts!r}: expected NAME=SHARE,... (e.g. train=0.8,heldout=0.2)"
                ) from None
    if not shares or any(v <= 0 for v in shares.values()) or not all(shares):
        raise UsageError(f"parts={parts!r}: every part needs a name and a share > 0")
    return shares


FILTERS = (
    "deduplicate",
    "drop_identical",
    "max_similarity",
    "min_agreement",
    "min_score_gap",
    "min_confidence",
    "rebalance_length",
    "skip_invalid",
)
"""The DataConfig fields that `filter` (and `dpokit data filter`) takes: same names, docs and defaults."""


def _tokenizer(model: str | None):
    if not model:
        return None
    from dpokit.models import load_tokenizer, resolve_model_path

    return load_tokenizer(resolve_model_path(model, "model"))


def load(
    target, *, checkpoint: str | int | None = None, reference: bool | str = False, device: str | None = None
):
    """The trained policy of a run (its final checkpoint, or `checkpoint`: best, latest, a step), of a
    checkpoint folder or of a model, with its tokenizer, ready for `generate` (`policy.generate(prompt)`, or
    `policy.model.generate(...)`). `reference=True`: also the reference it trained against (adapters off,
    the starting model, or its model.reference); a model name: that model."""
    from dpokit.trained import load_trained

    return load_trained(target, checkpoint=checkpoint, reference=reference, device=device)
