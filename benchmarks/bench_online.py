"""On-policy DPO: one round of `dpokit iterate` against TRL 1.16's OnlineDPOTrainer, on Anthropic HH.

    python benchmarks/bench_online.py                      # both tools, then each evaluated on held-out prompts
    python benchmarks/bench_online.py --only trl           # one tool
    python benchmarks/bench_online.py --only trl --dpokit-run runs/hh-iterate   # dpokit: that run's round 1

Needs the split and the reward model of configs/hh_rm.yaml (runs/hh-helpful, runs/hh-rm). Both tools train
SmolLM2-135M-Instruct + LoRA r16 on q/k/v/o (lr 3e-4, 2 warmup steps, cosine, beta 0.1, bf16) on the first 64
prompts of runs/hh-helpful/rounds.jsonl, sample up to 128 new tokens at temperature 1, score with the same
reward model (runs/hh-rm/reward_model; an answer cut at 128 tokens scores 1 lower) and take 16 optimizer steps
of 8 pairs over 256 sampled completions:

- dpokit: one round of configs/hh_iterate.yaml: 4 samples of each prompt, best against worst, 2 epochs.
- TRL: 2 epochs of the 64 prompts in batches of 8; each step samples 2 completions per prompt and trains
  on them at once (TRL's online DPO samples inside every step).

Then `dpokit eval` measures each policy on the same 64 held-out prompts (runs/hh-helpful/heldout.jsonl, 2
samples each, the rounds' evaluation seed) against the initial model: reward-model reward, win rate, KL, length. Prints wall time,
sampled completions per second of the whole training, and those figures. `--dpokit-run RUN` takes dpokit's
side from round 1 of a `dpokit iterate configs/hh_iterate.yaml` run instead of training it again (the same
settings; its round-1 evaluation is this one, with the same reference completions): wall time from the
run's config.yaml to round 1's trained checkpoint (model loading included). TRL is not a dependency:
`pip install trl` (the benchmark imports trl.experimental.online_dpo).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODEL = "smollm2-135m-instruct"
PROMPTS = ROOT / "runs/hh-helpful/rounds.jsonl"
HELD_OUT = ROOT / "runs/hh-helpful/heldout.jsonl"
RM = ROOT / "runs/hh-rm"
N_PROMPTS, LR, BETA, BATCH, EPOCHS, NEW_TOKENS, EOS_PENALTY = 64, 3e-4, 0.1, 8, 2, 128, 1.0


def child_dpokit(out: Path) -> dict:
    import dpokit

    started = time.perf_counter()
    dpokit.iterate(
        str(ROOT / "configs/hh_iterate.yaml"),
        **{
            "iterate.rounds": 1,
            "iterate.eval_prompts": "",
            "train.run_dir": str(out),
            "train.progress": False,
            "iterate.prompts": str(PROMPTS),
            "iterate.reward": f"model:{RM}",
        },
    )
    return {
        "target": str(out),
        "ref": None,
        "wall_s": time.perf_counter() - started,
        "completions": N_PROMPTS * 4,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def child_trl(out: Path) -> dict:
    import datasets
    from accelerate.utils import set_seed
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    from dpokit import models
    from dpokit.data.prompts import load_prompts

    prompts = load_prompts(str(PROMPTS), None, N_PROMPTS, "--prompts")
    path = models.resolve_model_path(MODEL)
    tok = models.load_tokenizer(path)
    set_seed(0)
    policy = models.add_lora(models.load_model(path), 16, 32.0, 0.0, ["q_proj", "k_proj", "v_proj", "o_proj"])
    rm_path = str(RM / "reward_model")
    reward_model = AutoModelForSequenceClassification.from_pretrained(rm_path, num_labels=1)
    config = OnlineDPOConfig(
        output_dir=str(out / "trainer"),
        per_device_train_batch_size=BATCH,
        num_train_epochs=EPOCHS,
        learning_rate=LR,
        lr_scheduler_type="cosine",
        warmup_steps=2,
        beta=BETA,
        max_new_tokens=NEW_TOKENS,
        max_length=512,
        temperature=1.0,
        missing_eos_penalty=EOS_PENALTY,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        bf16=True,
        use_cpu=True,
        # OnlineDPOConfig defaults to gradient checkpointing, which also turns the KV cache off while it
        # samples (online_dpo_trainer.py: use_cache=not gradient_checkpointing): every new token recomputes
        # the whole sequence. With it the first of 16 steps had not finished after 50 min here; dpokit keeps
        # its cache, so TRL keeps its too
        gradient_checkpointing=False,
        seed=0,
    )
    trainer = OnlineDPOTrainer(
        model=policy,
        reward_funcs=reward_model,
        args=config,
        processing_class=tok,
        reward_processing_classes=AutoTokenizer.from_pretrained(rm_path),
        train_dataset=datasets.Dataset.from_list([{"prompt": p} for p in prompts]),
    )
    started = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - started
    steps = trainer.state.global_step
    merged = trainer.model.merge_and_unload()  # a plain model folder that `dpokit eval --ref` reads
    merged.save_pretrained(out / "merged")
    tok.save_pretrained(out / "merged")
    return {
        "target": str(out / "merged"),
        "ref": MODEL,
        "wall_s": wall,
        "steps": steps,
        "completions": steps * BATCH * 2,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def held_out(result: dict, out: Path) -> dict:
    import dpokit

    ev = dpokit.evaluate(
        result["target"],
        prompts=str(HELD_OUT),
        reward=f"model:{RM}",
        ref=result["ref"],
        out=str(out),
        num_prompts=N_PROMPTS,
        max_new_tokens=NEW_TOKENS,
        seed=999,  # the rounds' evaluation seed and batch: the same reference completions
        batch_size=64,
    )
    return ev.results["generation"]


def from_run(run: Path) -> tuple[dict, dict]:
    """dpokit's side from round 1 of an iterate run of configs/hh_iterate.yaml."""
    round_1 = run / "rounds" / "1"
    wall = (round_1 / "train" / "summary.json").stat().st_mtime - (run / "config.yaml").stat().st_mtime
    pairs = json.loads((round_1 / "pair_stats.json").read_text())
    result = {"wall_s": wall, "completions": pairs["samples"], "peak_rss_mib": float("nan")}
    return result, json.loads((round_1 / "eval.json").read_text())


def run_child(tool: str, out: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", tool, "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{tool} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=["dpokit", "trl"])
    p.add_argument("--child", choices=["dpokit", "trl"])
    p.add_argument("--out")
    p.add_argument(
        "--dpokit-run", help="an iterate run of configs/hh_iterate.yaml: dpokit's figures from its round 1"
    )
    args = p.parse_args()
    if args.child:
        fn = child_dpokit if args.child == "dpokit" else child_trl
        print(json.dumps(fn(Path(args.out))))
        return
    for need in (PROMPTS, HELD_OUT, RM / "reward_model"):
        if not need.exists():
            raise SystemExit(f"{need}: missing; make it as configs/hh_rm.yaml says (data split, train-rm)")
    work = Path(tempfile.mkdtemp(prefix="bench-online-"))
    if args.dpokit_run:
        report("dpokit (round 1 of " + args.dpokit_run + ")", *from_run(Path(args.dpokit_run)))
    for tool in [args.only] if args.only else ["dpokit", "trl"]:
        result = run_child(tool, work / tool)
        report(tool, result, held_out(result, work / f"{tool}-eval"))
    print(f"(runs in {work})")


def report(tool: str, result: dict, figures: dict) -> None:
    keep = (
        "reward/policy",
        "reward/reference",
        "reward/gain_length_controlled",
        "win_rate",
        "win_rate/initial",
        "kl/sequence",
        "length/policy",
        "finished/policy",
    )
    print(
        f"{tool}: {result['wall_s']:.0f} s training wall, {result['completions']} completions "
        f"({result['completions'] / result['wall_s']:.2f}/s), peak RSS {result['peak_rss_mib']:.0f} MiB; "
        f"held-out {json.dumps({k: round(v, 4) for k, v in figures.items() if k in keep})}",
        flush=True,
    )


if __name__ == "__main__":
    main()
