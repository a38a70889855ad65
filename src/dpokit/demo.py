"""`make demo`: the DPO paper's first experiment (controlled sentiment generation, Rafailov et al. 2023,
sec. 6.1) on the embedded SmolLM2-135M-Instruct, on CPU in minutes.

1. Sample two continuations of each movie-review opening from the starting model (the reference).
2. Score them with VADER sentiment; the more positive one is chosen (or drawn Bradley-Terry style).
3. Train DPO with LoRA on those pairs.
4. On held-out openings: sample from the trained policy and from the reference, and compare mean reward,
   win rate and the sampled KL(policy || reference).

`--sweep` adds several beta values, preferred-FT (SFT on the chosen completions) and best-of-N sampling from
the reference, and draws the reward-vs-KL frontier of the paper's figure 2 in the report.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import torch

from dpokit import models
from dpokit.config import load_config
from dpokit.data.prompts import load_prompts
from dpokit.evaluation import generation_metrics
from dpokit.files import write_jsonl
from dpokit.generate import Sample, SamplingSettings, sample
from dpokit.loop import train
from dpokit.reference import Reference
from dpokit.rewards import get_reward
from dpokit.rundir import Run
from dpokit.trained import load_trained

log = logging.getLogger(__name__)


@dataclass
class DemoSettings:
    train_prompts: int = 320
    eval_prompts: int = 64
    eval_samples: int = 2
    """Samples per held-out prompt from each model."""
    max_new_tokens: int = 32
    temperature: float = 1.0
    labeling: str = "higher"
    """higher: the higher reward is chosen (ties dropped); bradley_terry: chosen with probability
    sigmoid((r1 - r2) / bt_scale)."""
    bt_scale: float = 0.25
    reward: str = "vader"
    sweep_betas: list[float] = field(default_factory=lambda: [0.05, 0.25, 1.0])
    best_of: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    interpolate: list[float] = field(default_factory=lambda: [0.4, 0.6])
    """The iterative run's last round, interpolated toward the initial model at these lambdas (LITI): more
    points of its reward-KL curve for the price of sampling."""
    seed: int = 0


TRAIN_SETTINGS = [
    "model.name=smollm2-135m-instruct",
    "data.max_length=96",
    "data.max_prompt_length=32",
    "lora.enabled=true",
    "lora.r=8",
    "lora.alpha=16",
    "lora.target_modules=[q_proj,k_proj,v_proj,o_proj]",
    "loss.type=sigmoid",
    "loss.beta=0.1",
    "train.batch_size=8",
    "train.epochs=2",
    "train.lr=1.0e-3",
    "train.warmup_steps=4",
    "train.scheduler=cosine",
    "train.bf16=true",
    "train.prefix_sharing=true",
    "train.packing=true",
    "train.precompute_ref=true",
    "train.flat_window=0",
    "eval.every=20",
    "eval.batch_size=32",
]


@dataclass
class DemoResult:
    run_dir: Path
    generation: dict
    preference_before: dict | None
    preference_after: dict | None
    frontier: list[dict] | None
    wall_s: float


def label_pairs(
    prompts: list,
    samples: list[list[Sample]],
    rewards: list[list[float]],
    how: str,
    scale: float,
    rng: random.Random,
) -> list[dict]:
    """One pair per prompt from its two samples; pairs with equal rewards or equal texts are dropped."""
    pairs = []
    for prompt, (a, b), (ra, rb) in zip(prompts, samples, rewards, strict=True):
        if a.completion.strip() == b.completion.strip() or ra == rb:
            continue
        if how == "bradley_terry":
            first = rng.random() < 1 / (1 + math.exp(-(ra - rb) / scale))
        else:
            first = ra > rb
        (c, rc), (r, rr) = ((a, ra), (b, rb)) if first else ((b, rb), (a, ra))
        pairs.append(
            {
                "prompt": prompt,
                "chosen": c.completion,
                "rejected": r.completion,
                "score_chosen": rc,
                "score_rejected": rr,
            }
        )
    return pairs


def run_demo(
    overrides: list[str] | None = None,
    sweep: bool = False,
    run_dir: str | None = None,
    settings: DemoSettings | None = None,
) -> DemoResult:
    started = time.perf_counter()
    ds = settings or DemoSettings()
    overrides = list(overrides or [])
    run = Run(run_dir or Path("runs") / datetime.now().strftime("demo-%Y%m%d-%H%M%S"))
    root = run.path
    base_cfg = load_config(
        None, [*TRAIN_SETTINGS, "data.train=(sampled below)", *overrides]
    )  # model and precision
    reward = get_reward(ds.reward)
    sampling = SamplingSettings(
        max_new_tokens=ds.max_new_tokens, temperature=ds.temperature, seed=ds.seed, bf16=base_cfg.train.bf16
    )
    train_prompts = load_prompts("builtin:reviews", "train", ds.train_prompts)
    eval_prompts = load_prompts("builtin:reviews", "eval", ds.eval_prompts)

    path = models.resolve_model_path(base_cfg.model.name)
    tokenizer = models.load_tokenizer(path)
    reference = Reference.separate(models.load_model(path), bf16=base_cfg.train.bf16)
    t0 = time.perf_counter()
    with reference.module() as ref_model:
        train_samples = sample(
            ref_model, tokenizer, train_prompts, 2, sampling, label="reference samples (train prompts)"
        )
        eval_samples = sample(
            ref_model,
            tokenizer,
            eval_prompts,
            max(2, ds.eval_samples),
            sampling,
            label="reference samples (eval prompts)",
        )
    sampling_s = time.perf_counter() - t0
    rng = random.Random(ds.seed)
    data = {}
    for name, prompts, samples in (
        ("train", train_prompts, train_samples),
        ("eval", eval_prompts, eval_samples),
    ):
        flat = reward(
            [p for p in prompts for _ in range(2)], [s.completion for row in samples for s in row[:2]]
        )
        scores = [flat[2 * i : 2 * i + 2] for i in range(len(prompts))]
        pairs = label_pairs(prompts, [row[:2] for row in samples], scores, ds.labeling, ds.bt_scale, rng)
        run.data_file(name).parent.mkdir(parents=True, exist_ok=True)
        write_jsonl(run.data_file(f"{name}_pairs"), pairs)
        data[name] = len(pairs)
    log.info(
        "labeled %d train / %d eval pairs with reward %r in %.0f s of sampling",
        data["train"],
        data["eval"],
        ds.reward,
        sampling_s,
    )
    _write_data_check(run, tokenizer, base_cfg)

    data_args = [f"data.train={run.data_file('train_pairs')}", f"data.eval={run.data_file('eval_pairs')}"]
    bench = Bench(
        data_args, overrides, tokenizer, reference, eval_prompts, eval_samples, reward, ds, sampling
    )
    cfg, result, gen, records = train_and_compare(bench, run, [])
    results = {
        "reward": ds.reward,
        "demo": {k: v for k, v in ds.__dict__.items()},
        "pairs": data,
        "generation": gen,
        "preference_before": _strip(result.initial_eval),
        "preference_after": _strip(result.final_eval),
        "sampling_s": sampling_s,
    }
    frontier = None
    if sweep:
        del result
        frontier = run_sweep(bench, run, cfg, gen)
        run.write_frontier(frontier)
    results["wall_s"] = time.perf_counter() - started
    run.write_eval(results, records)
    run.report()
    return DemoResult(
        root, gen, results["preference_before"], results["preference_after"], frontier, results["wall_s"]
    )


def _train_config(run_dir: Path, data_args: list[str], overrides: list[str]):
    return load_config(
        None, [*TRAIN_SETTINGS, *data_args, f"train.run_dir={run_dir}", "train.overwrite=true", *overrides]
    )


def _strip(metrics: dict | None) -> dict | None:
    return {k.removeprefix("eval/"): v for k, v in metrics.items()} if metrics else None


def _write_data_check(run: Run, tokenizer, cfg) -> None:
    from dpokit.data.check import check_file

    report = check_file(
        str(run.data_file("train_pairs")), tokenizer, cfg.data.max_length, cfg.data.max_prompt_length
    )
    run.write_data_check(report)


@dataclass
class Bench:
    """What every policy of a demo run is trained with and compared on."""

    data_args: list[str]
    overrides: list[str]
    tokenizer: object
    reference: Reference
    """The starting model, which sampled the pairs and the held-out reference completions."""
    eval_prompts: list
    eval_samples: list[list[Sample]]
    reward: object
    ds: DemoSettings
    sampling: SamplingSettings


def train_and_compare(bench: Bench, run: Run, extra: list[str]):
    """Train on the demo pairs (with `extra` overrides) and compare the policy with its reference (the one
    it trained against) on the held-out prompts: (config, run result, generation metrics, per-prompt
    records)."""
    cfg = _train_config(run.path, bench.data_args, bench.overrides + extra)
    result = train(cfg)
    result.model = None  # measured as saved: loaded again below, with its reference
    gen, records = generation_metrics(
        load_trained(result.run, reference=True),
        bench.eval_prompts,
        bench.reward,
        bench.ds.eval_samples,
        bench.sampling,
        reference_samples=bench.eval_samples,
    )
    return cfg, result, gen, records


def run_sweep(bench: Bench, run: Run, cfg, main_gen: dict) -> list[dict]:
    """One (KL, reward) point per method: DPO at each beta, preferred-FT, best-of-N from the reference."""
    points = [_point("DPO", f"beta={cfg.loss.beta:g}", main_gen, beta=cfg.loss.beta)]
    runs = [
        (f"beta-{b:g}", [f"loss.beta={b}"], "DPO", f"beta={b:g}")
        for b in bench.ds.sweep_betas
        if b != cfg.loss.beta
    ]
    runs.append(("preferred-ft", ["loss.type=[sft]", "lora.enabled=true"], "Preferred-FT", "SFT on chosen"))
    for name, extra, method, label in runs:
        sweep_cfg, result, gen, records = train_and_compare(bench, run.sweep(name), extra)
        run.sweep(name).write_eval({"reward": bench.ds.reward, "generation": gen}, records)
        points.append(_point(method, label, gen, beta=sweep_cfg.loss.beta if method == "DPO" else None))
        del result
    return points + iterative_points(bench, run.sweep("iterative")) + best_of_n(bench)


def iterative_points(bench: Bench, run: Run, rounds: int = 3) -> list[dict]:
    """On-policy iterative DPO (`dpokit iterate`) with the one-round run's budget: the same train prompts,
    split into `rounds` fresh slices, 2 samples per prompt (as many sampled completions, and so at most
    as many pairs), each round training 2 epochs on its pairs from the policy the last round trained,
    against the initial model. One frontier point per round, measured like every other point."""
    from dpokit.rounds import Iteration, run_iterate

    ds = bench.ds
    cfg = load_config(
        None,
        [
            *TRAIN_SETTINGS,
            *bench.overrides,
            f"train.run_dir={run.path}",
            "train.overwrite=true",
            f"iterate.rounds={rounds}",
            "iterate.prompts=builtin:reviews",
            "iterate.prompts_split=train",
            f"iterate.prompts_per_round={ds.train_prompts // rounds}",
            "iterate.samples_per_prompt=2",
            f"iterate.max_new_tokens={ds.max_new_tokens}",
            f"iterate.temperature={ds.temperature}",
            f"iterate.reward={ds.reward}",
            f"iterate.seed={ds.seed}",
        ],
        "iterate",
    )
    results = run_iterate(cfg)
    it = Iteration(cfg, run.path)
    points = []
    for r in results:
        gen, records = generation_metrics(
            it.compared(r.round),
            bench.eval_prompts,
            bench.reward,
            ds.eval_samples,
            bench.sampling,
            reference_samples=bench.eval_samples,
        )
        run.round(r.round).frontier.write_eval({"reward": ds.reward, "generation": gen}, records)
        label = f"round {r.round}: {r.summary['data']['pairs']} pairs"
        points.append(_point("Iterative DPO", label, gen, beta=cfg.loss.beta))
    # the iterate run itself (its last round) interpolates toward the initial model, not the round's start
    last = load_trained(run.path, reference="base" if cfg.lora.enabled else cfg.model.name)
    for lam in ds.interpolate:
        gen, records = generation_metrics(
            last.interpolate(lam),
            bench.eval_prompts,
            bench.reward,
            ds.eval_samples,
            bench.sampling,
            reference_samples=bench.eval_samples,
        )
        run.round(results[-1].round).frontier_at(lam).write_eval(
            {"reward": ds.reward, "generation": gen, "lambda": lam}, records
        )
        label = f"round {results[-1].round} x {lam:g}: interpolated"
        points.append(_point("Iterative DPO", label, gen, beta=cfg.loss.beta))
    return points


def _point(method: str, label: str, gen: dict, beta: float | None = None) -> dict:
    return {
        "method": method,
        "label": label,
        "beta": beta,
        "kl": gen["kl/sequence"],
        "kl_stderr": gen["kl/sequence_stderr"],
        "reward": gen["reward/policy"],
        "reward_stderr": gen["reward/policy_stderr"],
        "kl_kind": "sampled",
    }


def best_of_n(bench: Bench) -> list[dict]:
    """Best-of-N from the reference: for each prompt keep the highest-reward of N samples. Its KL from the
    reference is at most log N - (N - 1) / N (the standard analytic bound), reported as such."""
    ds, prompts, reward = bench.ds, bench.eval_prompts, bench.reward
    n_max = max(ds.best_of)
    settings = dataclasses.replace(bench.sampling, seed=bench.sampling.seed + 1)  # independent of the others
    with bench.reference.module() as ref_model:
        samples = sample(
            ref_model, bench.tokenizer, prompts, n_max, settings, label=f"best-of-{n_max} samples"
        )
    flat = [p for p in prompts for _ in range(n_max)]
    scores = torch.tensor(reward(flat, [s.completion for row in samples for s in row])).view(
        len(prompts), n_max
    )
    points = []
    for n in ds.best_of:
        best = scores[:, :n].max(dim=1).values
        points.append(
            {
                "method": "Best-of-N",
                "label": f"N={n}",
                "n": n,
                "kl": math.log(n) - (n - 1) / n,
                "kl_stderr": 0.0,
                "reward": float(best.mean()),
                "reward_stderr": float(best.std() / math.sqrt(len(best))),
                "kl_kind": "analytic bound",
            }
        )
    return points


def summary_lines(result: DemoResult) -> list[str]:
    g = result.generation
    before, after = result.preference_before or {}, result.preference_after or {}
    lines = [
        f"held-out prompts: {g['prompts']} x {g['samples_per_prompt']} samples from each model",
        f"{'':34}{'reference':>11}{'DPO policy':>12}",
        f"{'mean sentiment reward':34}{g['reward/reference']:>11.3f}{g['reward/policy']:>12.3f}",
        f"{'completion tokens':34}{g['length/reference']:>11.1f}{g['length/policy']:>12.1f}",
        f"win rate of policy over reference: {g['win_rate']:.3f}",
        f"KL(policy || reference): {g['kl/sequence']:.2f} nats per completion ({g['kl/token']:.3f} per token)",
        f"held-out pair accuracy {before.get('rewards/accuracies', float('nan')):.3f} -> {after.get('rewards/accuracies', float('nan')):.3f}, "
        f"margin {before.get('rewards/margins', float('nan')):+.3f} -> {after.get('rewards/margins', float('nan')):+.3f}",
    ]
    if result.frontier:
        lines.append("reward-vs-KL frontier:")
        for p in result.frontier:
            lines.append(
                f"  {p['method']:<13}{p['label']:<15} KL {p['kl']:6.2f} ({p['kl_kind']})  reward {p['reward']:.3f}"
            )
    lines.append(
        f"run dir: {result.run_dir}   report: {result.run_dir / 'report.html'}   wall: {result.wall_s / 60:.1f} min"
    )
    return lines
