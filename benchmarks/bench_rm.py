"""Reward models: dpokit train-rm against TRL's RewardTrainer (TRL 1.16), on Anthropic HH helpful-base pairs.

    python benchmarks/bench_rm.py --parity              # 5 fp32 steps, full and LoRA: loss per step, weights
    python benchmarks/bench_rm.py --speed --rounds 3    # step time and peak RSS, each tool in its own processes

Both start from the same reward model (SmolLM2-135M-Instruct's transformer with one score head drawn from seed
0; for LoRA the same adapters, drawn after the same seed), see the same pairs in the same batches (dpokit's
step schedule, given to TRL in order with a sequential sampler), and train with AdamW, linear decay, clipping
at 1, fp32. Only pairs that both tokenize the same way are used (TRL tokenizes prompt + answer + EOS as one
text; dpokit tokenizes prompt and answer apart, so that the prompt is computed once) and that fit max_length
untruncated (TRL drops longer pairs, dpokit cuts them). TRL is not a dependency: `pip install trl`.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
from helpers import HH_HELPFUL as HH  # noqa: E402

MODEL = "smollm2-135m-instruct"


def select_pairs(n: int, max_length: int) -> list[dict]:
    """The first n HH helpful-base pairs whose prompt + answer + EOS tokenize as prompt, then answer + EOS,
    within max_length."""
    from dpokit.data import load_examples
    from dpokit.models import load_tokenizer, resolve_model_path
    from dpokit.tokenize import encode_example

    tok = load_tokenizer(resolve_model_path(MODEL))
    examples, _ = load_examples(str(HH), skip_invalid=True)
    out = []
    for e in examples:
        prompt, chosen, rejected = encode_example(e, tok)
        joint = [tok(e.prompt + c + tok.eos_token)["input_ids"] for c in (e.chosen, e.rejected)]
        if joint == [prompt + chosen, prompt + rejected] and max(map(len, joint)) <= max_length:
            out.append({"prompt": e.prompt, "chosen": e.chosen, "rejected": e.rejected})
        if len(out) == n:
            return out
    raise SystemExit(f"only {len(out)} HH pairs tokenize alike within {max_length} tokens")


def settings(args, lora: bool, run_dir: Path) -> dict:
    return {
        "model.name": MODEL,
        "lora.enabled": lora,
        "lora.r": 8,
        "lora.target_modules": ["q_proj", "v_proj"],
        "data.max_length": args.max_length,
        "data.max_prompt_length": args.max_length - 1,
        "data.eval_fraction": 0.0,
        "train.batch_size": args.batch_size,
        "train.max_steps": args.steps,
        "train.lr": 1e-4 if lora else 1e-5,
        "train.scheduler": "linear",
        "train.bf16": args.precision == "bf16",
        "train.run_dir": str(run_dir),
        "train.progress": False,
        "train.save_final": True,
        "eval.at_start": False,
    }


def child_dpokit(args, lora: bool, pairs: list[dict], out: Path) -> dict:
    import dpokit

    started = time.perf_counter()
    run = dpokit.train_rm(data=pairs, **settings(args, lora, out / "dpokit"))
    times = [r["step_time_s"] for r in run.history]
    return {
        "losses": [r["loss"] for r in run.history],
        "weights": str(run.final_checkpoint),
        "step_s": statistics.median(times[args.warmup :] or times),
        "wall_s": time.perf_counter() - started,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def child_trl(args, lora: bool, pairs: list[dict], out: Path) -> dict:
    """TRL's RewardTrainer on the pairs in dpokit's schedule order (a sequential sampler)."""
    import datasets
    from accelerate.utils import set_seed
    from torch.utils.data import SequentialSampler
    from trl import RewardConfig, RewardTrainer

    import dpokit
    from dpokit import models
    from dpokit.schedule import step_schedule

    cfg = dpokit.config(data={"train": "-"}, **settings(args, lora, out / "trl"), command="rm")
    order = [i for step in step_schedule(len(pairs), cfg.train) for micro in step for i in micro]
    path = models.resolve_model_path(MODEL)
    tok = models.load_tokenizer(path)
    model = models.load_reward_model(path, tok.pad_token_id, seed=cfg.train.seed)
    set_seed(cfg.train.seed)  # as dpokit's session: the adapters are drawn after this
    if lora:
        model = models.add_lora(model, 8, 16.0, 0.0, ["q_proj", "v_proj"], "SEQ_CLS")
    config = RewardConfig(
        output_dir=str(out / "trl"),
        per_device_train_batch_size=args.batch_size,
        max_steps=args.steps,
        learning_rate=cfg.train.lr,
        lr_scheduler_type="linear",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        bf16=args.precision == "bf16",
        use_cpu=True,
        seed=cfg.train.seed,
        max_length=args.max_length,
        dataloader_drop_last=True,
    )
    trainer = RewardTrainer(
        model=model,
        args=config,
        processing_class=tok,
        train_dataset=datasets.Dataset.from_list([pairs[i] for i in order]),
    )
    trainer._get_train_sampler = lambda *a, **k: SequentialSampler(trainer.train_dataset)
    step_times, clock = [], [time.perf_counter()]

    class Timer:  # a TrainerCallback by duck typing
        def __getattr__(self, name):
            return lambda *a, **k: None

        def on_step_end(self, *a, **k):
            now = time.perf_counter()
            step_times.append(now - clock[0])
            clock[0] = now

    trainer.add_callback(Timer())
    started = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - started
    folder = out / "trl" / "final"
    trainer.model.save_pretrained(folder)
    return {
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
        "weights": str(folder),
        "step_s": statistics.median(step_times[args.warmup :] or step_times),
        "wall_s": wall,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def weight_diff(a: Path, b: Path) -> tuple[float, list[str]]:
    """Largest |a - b| over the tensors both checkpoints hold (names without PEFT's prefixes), and their names."""
    from safetensors.torch import load_file

    def tensors(folder: Path) -> dict:
        state = {}
        for f in sorted(Path(folder).glob("*.safetensors")):
            state.update(load_file(str(f)))
        return {
            k.replace("base_model.model.", "").replace(".modules_to_save.default", ""): v
            for k, v in state.items()
        }

    ta, tb = tensors(a), tensors(b)
    shared = sorted(set(ta) & set(tb))
    return max(float((ta[k] - tb[k]).abs().max()) for k in shared), shared


def run_child(tool: str, args, lora: bool, pairs_file: Path, out: Path) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        tool,
        "--lora",
        str(lora).lower(),
        "--pairs",
        str(pairs_file),
        "--out",
        str(out),
    ]
    cmd += [
        "--steps",
        str(args.steps),
        "--batch-size",
        str(args.batch_size),
        "--max-length",
        str(args.max_length),
    ]
    cmd += ["--precision", args.precision, "--warmup", str(args.warmup)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{tool} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parity", action="store_true")
    p.add_argument("--speed", action="store_true")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--child", choices=["dpokit", "trl"])
    p.add_argument("--lora", default="true")
    p.add_argument("--pairs")
    p.add_argument("--out")
    args = p.parse_args()
    if args.child:
        pairs = json.loads(Path(args.pairs).read_text())
        fn = child_dpokit if args.child == "dpokit" else child_trl
        print(json.dumps(fn(args, args.lora == "true", pairs, Path(args.out))))
        return
    work = Path(tempfile.mkdtemp(prefix="bench-rm-"))
    pairs_file = work / "pairs.json"
    pairs_file.write_text(json.dumps(select_pairs(args.steps * args.batch_size, args.max_length)))
    if args.parity:
        for lora in (False, True):
            d = run_child("dpokit", args, lora, pairs_file, work / f"parity-{lora}")
            t = run_child("trl", args, lora, pairs_file, work / f"parity-{lora}")
            diff, names = weight_diff(Path(d["weights"]), Path(t["weights"]))
            loss_diff = max(abs(a - b) for a, b in zip(d["losses"], t["losses"], strict=True))
            print(
                f"{'LoRA' if lora else 'full'}: {args.steps} steps, losses dpokit {[round(x, 6) for x in d['losses']]}"
                f" TRL {[round(x, 6) for x in t['losses']]}; largest loss difference {loss_diff:.2e}, largest weight "
                f"difference {diff:.2e} over {len(names)} tensors"
            )
    if args.speed:
        results: dict = {"dpokit": [], "trl": []}
        for r in range(args.rounds):
            for tool in (
                ("dpokit", "trl") if r % 2 == 0 else ("trl", "dpokit")
            ):  # alternate: drift spreads evenly
                results[tool].append(run_child(tool, args, True, pairs_file, work / f"speed-{tool}-{r}"))
        for tool, rs in results.items():
            print(
                f"{tool}: step {statistics.median(x['step_s'] for x in rs):.2f} s (median of {len(rs)} processes), "
                f"peak RSS {statistics.median(x['peak_rss_mib'] for x in rs):.0f} MiB"
            )


if __name__ == "__main__":
    main()
