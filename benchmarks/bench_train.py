"""Side-by-side training speed and memory: dpokit layouts against TRL's DPOTrainer, same run.

Same model (SmolLM2-135M-Instruct), same pairs (Anthropic HH helpful-base, only pairs that fit
max_length untruncated, so both tools see identical tokens), same batch size, optimizer, lr, beta,
precision and thread count. Every contender runs in its own process (peak RSS is per process), the
contenders alternate round by round, and the reported step time is the median over rounds of each
process's median step time (warm-up steps excluded). Reference precomputation is reported separately
(`setup_s`), not inside step time.

    python benchmarks/bench_train.py                           # LoRA r=8 (q,v), fp32, 3 rounds
    python benchmarks/bench_train.py --mode full --rounds 2
    python benchmarks/bench_train.py --precision bf16 --contenders trl_fast dpokit_fast
    python benchmarks/bench_train.py --device cuda --precision bf16      # on a GPU: peak GPU memory too
"""

from __future__ import annotations

import argparse
import json
import os
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
from helpers import load_cfg  # noqa: E402

# name -> (tool, options); WORK says what a step of each computes: (reference forward in the step,
# prompt computed once per pair)
WORK = {
    "trl_default": (True, False),
    "trl_fast": (False, False),
    "dpokit_padded": (True, False),
    "dpokit_fast": (False, True),
    "dpokit_lean": (False, True),
    "dpokit_lean_lowmem": (False, True),
}
FAST = ["train.prefix_sharing=true", "train.packing=true", "train.precompute_ref=true"]
LEAN = [*FAST, "train.gradient_checkpointing=true", "train.logps_chunk_size=128"]
CONTENDERS = {
    "trl_default": ("trl", {"gradient_checkpointing": True, "precompute": False}),
    "trl_fast": ("trl", {"gradient_checkpointing": False, "precompute": True}),
    "dpokit_padded": ("dpokit", ["train.prefix_sharing=false", "train.packing=false"]),
    "dpokit_fast": ("dpokit", FAST),
    "dpokit_lean": ("dpokit", LEAN),
    "dpokit_lean_lowmem": ("dpokit", [*LEAN, "train.low_memory_allocator=true"]),
}


def select_pairs(n: int, max_length: int, max_prompt_length: int, out: Path) -> dict:
    """Write the first n HH pairs that need no truncation under either tool; return their token counts."""
    from dpokit.data import load_examples
    from dpokit.models import load_tokenizer, resolve_model_path
    from dpokit.tokenize import encode_example

    tokenizer = load_tokenizer(resolve_model_path("smollm2-135m-instruct"))
    examples, _ = load_examples(str(HH), skip_invalid=True)
    rows, tokens, shared = [], 0, 0
    for ex in examples:
        prompt, chosen, rejected = encode_example(ex, tokenizer)
        if len(prompt) > max_prompt_length or len(prompt) + max(len(chosen), len(rejected)) > max_length:
            continue
        rows.append({"prompt": ex.prompt, "chosen": ex.chosen, "rejected": ex.rejected})
        tokens += 2 * len(prompt) + len(chosen) + len(rejected)
        shared += len(prompt) + len(chosen) + len(rejected)
        if len(rows) == n:
            break
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"pairs": len(rows), "tokens": tokens, "shared_tokens": shared}


def child_dpokit(args, extra: list[str]) -> dict:
    from dpokit.loop import train

    run_dir = tempfile.mkdtemp(prefix="bench-dpokit-")
    overrides = [
        f"data.train={args.data}",
        "data.limit=0",
        "data.eval_fraction=0",
        f"data.max_length={args.max_length}",
        f"data.max_prompt_length={args.max_prompt_length}",
        f"lora.enabled={args.mode == 'lora'}",
        "lora.r=8",
        "lora.alpha=16",
        "lora.target_modules=[q_proj,v_proj]",
        f"train.batch_size={args.batch_size}",
        f"train.max_steps={args.warmup + args.steps}",
        f"train.lr={args.lr}",
        "train.scheduler=constant",
        "train.max_grad_norm=1.0",
        f"train.bf16={args.precision == 'bf16'}",
        f"train.fast_fp32_matmul={args.fast_fp32_matmul}",
        f"train.ref_cache_dir={run_dir}/ref",
        "eval.at_start=false",
        f"train.device={args.device}",
        *extra,
    ]
    t0 = time.perf_counter()
    result = train(load_cfg("smollm2-135m-instruct", run_dir, *overrides))
    wall = time.perf_counter() - t0
    times = [r["step_time_s"] for r in result.history]
    return {
        "step_times": times[args.warmup :],
        "wall_s": wall,
        "setup_s": wall - sum(times),
        "loss1": result.history[0]["loss"],
    }


def child_trl(args, opts: dict) -> dict:
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from dpokit.models import load_model, load_tokenizer, resolve_model_path

    path = resolve_model_path("smollm2-135m-instruct")
    model, tokenizer = load_model(path), load_tokenizer(path)
    rows = [json.loads(line) for line in Path(args.data).read_text().splitlines()]
    dataset = datasets.Dataset.from_list(rows)
    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t)

    config = DPOConfig(
        output_dir=tempfile.mkdtemp(prefix="bench-trl-"),
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1,
        max_steps=args.warmup + args.steps,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        max_grad_norm=1.0,
        beta=0.1,
        max_length=args.max_length,
        gradient_checkpointing=opts["gradient_checkpointing"],
        precompute_ref_log_probs=opts["precompute"],
        bf16=args.precision == "bf16",
        use_cpu=args.device == "cpu",
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        dataloader_num_workers=0,
        seed=0,
    )
    peft_config = None
    if args.mode == "lora":
        peft_config = LoraConfig(
            r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"
        )
    t0 = time.perf_counter()
    trainer = DPOTrainer(
        model=model,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[StepTimer()],
    )
    trainer.train()
    wall = time.perf_counter() - t0
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    del torch
    return {
        "step_times": times[args.warmup :],
        "wall_s": wall,
        "setup_s": wall - sum(times),
        "loss1": losses[0] if losses else None,
    }


def run_child(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    if args.fast_fp32_matmul:  # global flags go to both sides of a comparison
        torch.backends.mkldnn.matmul.fp32_precision = "bf16"
    tool, opts = CONTENDERS[args.child]
    out = child_trl(args, opts) if tool == "trl" else child_dpokit(args, opts)
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if args.device == "cuda":
        out["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    print("BENCH_RESULT " + json.dumps(out), flush=True)


def matmul_peak(threads: int, dtype: str, device: str = "cpu") -> float:
    """GFLOP/s of an n^3 matmul in this process (fp32 default path or bf16): n = 2048 on the CPU, 8192 on a
    GPU."""
    import torch

    torch.set_num_threads(threads)
    dt = torch.bfloat16 if dtype == "bf16" else torch.float32
    n = 8192 if device == "cuda" else 2048
    a, b = torch.randn(n, n, dtype=dt, device=device), torch.randn(n, n, dtype=dt, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(2):
        a @ b
    sync()
    t0 = time.perf_counter()
    reps = 10
    for _ in range(reps):
        a @ b
    sync()
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9


def model_flops_per_step(tokens: float, shared_tokens: float, mode: str, params: float, name: str) -> float:
    """Matmul work a contender's step really executes, recomputation excluded: policy forward + backward
    (6N per token for full fine-tuning; 4N for LoRA, whose frozen weights need no weight gradients), plus a
    reference forward (2N per token) when it is not precomputed; prefix sharing computes the prompt once."""
    ref_in_step, prefix_shared = WORK[name]
    t = shared_tokens if prefix_shared else tokens
    return ((6 if mode == "full" else 4) + (2 if ref_in_step else 0)) * params * t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=list(CONTENDERS))
    ap.add_argument("--mode", choices=["lora", "full"], default="lora")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument(
        "--fast-fp32-matmul", action="store_true", help="oneDNN fp32 matmul path for every contender"
    )
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--max-prompt-length", type=int, default=256)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        run_child(args)
        return
    if any(CONTENDERS[c][0] == "trl" for c in args.contenders):
        try:
            import trl  # noqa: F401
        except ImportError:
            print("TRL is not installed (pip install -e .[trl]); running dpokit contenders only")
            args.contenders = [c for c in args.contenders if CONTENDERS[c][0] != "trl"]
    work = Path(tempfile.mkdtemp(prefix="bench-"))
    data = work / "pairs.jsonl"
    n_pairs = args.batch_size * (args.warmup + args.steps)
    info = select_pairs(n_pairs, args.max_length, args.max_prompt_length, data)
    tokens_per_step = info["tokens"] / (args.warmup + args.steps)
    shared_per_step = info["shared_tokens"] / (args.warmup + args.steps)
    results: dict[str, list[dict]] = {c: [] for c in args.contenders}
    base = (
        [sys.executable, __file__, "--data", str(data)]
        + [
            f"--{k.replace('_', '-')}={v}"
            for k, v in vars(args).items()
            if k
            in (
                "mode",
                "precision",
                "steps",
                "warmup",
                "batch_size",
                "max_length",
                "max_prompt_length",
                "lr",
                "threads",
                "device",
            )
        ]
        + (["--fast-fp32-matmul"] if args.fast_fp32_matmul else [])
    )
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    for rnd in range(args.rounds):
        order = args.contenders if rnd % 2 == 0 else args.contenders[::-1]  # alternate to spread drift
        for name in order:
            proc = subprocess.run([*base, "--child", name], capture_output=True, text=True, env=env)
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH_RESULT ")), None)
            if line is None:
                print(f"{name} failed:\n{proc.stderr[-3000:]}")
                continue
            res = json.loads(line[len("BENCH_RESULT ") :])
            results[name].append(res)
            print(
                f"round {rnd + 1} {name:14} {statistics.median(res['step_times']):6.2f} s/step  "
                f"peak RSS {res['peak_rss_mib']:6.0f} MiB  setup {res['setup_s']:5.1f} s  loss1 {res['loss1']}",
                flush=True,
            )
    peak = matmul_peak(args.threads, args.precision, args.device)
    from dpokit.models import load_model, resolve_model_path

    model = load_model(resolve_model_path("smollm2-135m-instruct"))
    params = (
        sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n)
        + model.config.vocab_size * model.config.hidden_size
    )
    summary = {}
    for name, runs in results.items():
        if not runs:
            continue
        flops = model_flops_per_step(tokens_per_step, shared_per_step, args.mode, params, name)
        step = statistics.median(statistics.median(r["step_times"]) for r in runs)
        summary[name] = {
            "s_per_step": step,
            "pairs_per_s": args.batch_size / step,
            "tokens_per_s": tokens_per_step / step,
            "peak_rss_mib": statistics.median(r["peak_rss_mib"] for r in runs),
            "setup_s": statistics.median(r["setup_s"] for r in runs),
            "peak_gpu_mib": statistics.median(r.get("peak_gpu_mib", 0.0) for r in runs),
            "mfu": flops / step / (peak * 1e9),
            "processes": len(runs),
        }
    print(
        f"\n{args.mode}, {args.precision}{' + oneDNN fp32' if args.fast_fp32_matmul else ''}, batch {args.batch_size} pairs, "
        f"max_length {args.max_length}, {tokens_per_step:.0f} tokens/step, {args.threads} threads, "
        f"matmul peak {peak:.0f} GFLOP/s, medians of {args.rounds} processes"
    )
    gpu = args.device == "cuda"
    memory = "peak_gpu_mib" if gpu else "peak_rss_mib"  # on a GPU, its memory is the one that limits
    print(
        f"{'contender':16}{'s/step':>8}{'pairs/s':>9}{'tok/s':>8}{'GPU MiB' if gpu else 'peak MiB':>10}{'setup s':>9}{'MFU':>7}"
    )
    for name, s in summary.items():
        print(
            f"{name:16}{s['s_per_step']:8.2f}{s['pairs_per_s']:9.3f}{s['tokens_per_s']:8.0f}{s[memory]:10.0f}{s['setup_s']:9.1f}{s['mfu']:7.1%}"
        )
    for ours in [n for n in summary if n.startswith("dpokit")]:
        for theirs in [n for n in summary if n.startswith("trl")]:
            a, b = summary[ours], summary[theirs]
            print(
                f"{ours} / {theirs}: speed x{b['s_per_step'] / a['s_per_step']:.2f}, "
                f"{'peak GPU memory' if gpu else 'peak RSS'} x{a[memory] / b[memory]:.2f}"
            )
    if args.out:
        args.out.write_text(
            json.dumps(
                {
                    "args": {k: str(v) for k, v in vars(args).items()},
                    "tokens_per_step": tokens_per_step,
                    "matmul_peak_gflops": peak,
                    "results": summary,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
