#!/usr/bin/env bash
# The GPU check: on a machine with an NVIDIA GPU, builds the extension with the CUDA kernels, runs
# every GPU test (pytest -m gpu) and the GPU benchmarks, writes the full logs to OUTDIR and prints a
# short table last. Made for one short lease of a GPU machine (docs/GPU.md): the whole script stops
# itself within GPU_CHECK_BUDGET_S seconds (default 450, under 8 minutes), each part under `timeout`.
#
#     bash benchmarks/gpu_check.sh OUTDIR
#
# Exit status: 0 when the build and the GPU tests passed; 1 when either failed (benchmark and optional
# results are reported in the table, not in the status); 2 without a GPU or without OUTDIR.
# Environment: PYTHON (default python3), TORCH_CUDA_ARCH_LIST (default 9.0: only the GPU at hand),
# GPU_CHECK_BUDGET_S (default 520), GPU_CHECK_PARTS (default kernels,system), GPU_CHECK_STEPS (run only
# these comma-separated steps, e.g. environment,build,tune-adamw8bit; default all), ADAMW8BIT_PROVIDERS
# (bench_adamw8bit's providers), CUDA_HOME (default /usr/local/cuda when it exists).
#
# OUTDIR receives two files (the device tool brings back at most 8): summary.txt, and results.tar.gz
# with every log (environment, build, GPU tests, benchmarks, the 13B runs' outputs) and every JSON.
set -u -o pipefail

if [ $# -ne 1 ]; then
  echo "usage: bash benchmarks/gpu_check.sh OUTDIR" >&2
  exit 2
fi
cd "$(dirname "$0")/.."
OUT=$(mkdir -p "$1" && cd "$1" && pwd) || { echo "gpu_check: cannot create $1" >&2; exit 2; }
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET_S:-520}
PARTS=${GPU_CHECK_PARTS:-kernels,system}
WORK=$(mktemp -d)  # logs and JSONs, packed into OUTDIR/results.tar.gz at the end
wants() { [[ ",$PARTS," == *",$1,"* ]]; }
export PYTHONUNBUFFERED=1

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "gpu_check: no NVIDIA GPU here (nvidia-smi is missing or sees no device); run it on a GPU machine" >&2
  exit 2
fi
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; then
  echo "gpu_check: nvidia-smi sees a GPU but $PY's torch does not (torch.cuda.is_available() is False," \
       "or torch is missing); use a CUDA build of torch" >&2
  exit 2
fi

NAMES=() STATUSES=() TIMES=() DETAILS=()
record() { NAMES+=("$1"); STATUSES+=("$2"); TIMES+=("$3"); DETAILS+=("$4"); }

# run_step NAME LIMIT_S LOG CMD...: runs CMD under timeout (LIMIT_S, cut to what the budget has left),
# appends its output to LOG, records PASS / FAIL(rc) / TIMEOUT; returns CMD's status.
run_step() {
  local name=$1 limit=$2 log=$3
  shift 3
  if [ -n "${GPU_CHECK_STEPS:-}" ] && [[ ",$GPU_CHECK_STEPS," != *",$name,"* ]]; then
    record "$name" SKIP 0 "not in GPU_CHECK_STEPS"
    return 3
  fi
  local left=$((BUDGET - SECONDS - 15))
  if ((left < 20)); then
    record "$name" SKIP 0 "the ${BUDGET}s budget is spent"
    return 3
  fi
  ((limit > left)) && limit=$left
  local start=$SECONDS status rc
  echo "=== $name: $* (limit ${limit}s)" >>"$log"
  timeout --kill-after=10 "$limit" "$@" >>"$log" 2>&1
  rc=$?
  if ((rc == 0)); then status=PASS; elif ((rc == 124 || rc == 137)); then status=TIMEOUT; else status="FAIL(rc=$rc)"; fi
  echo "=== $name: $status after $((SECONDS - start))s" >>"$log"
  record "$name" "$status" "$((SECONDS - start))" "$(basename "$log")"
  return $rc
}

skip() { record "$1" SKIP 0 "$2"; }

# --- environment -----------------------------------------------------------------------------------
if [ -z "${CUDA_HOME:-}" ] && [ -d /usr/local/cuda ]; then export CUDA_HOME=/usr/local/cuda; fi
NVCC=nvcc
command -v nvcc >/dev/null 2>&1 || NVCC=${CUDA_HOME:-/usr/local/cuda}/bin/nvcc
ENV_LOG=$WORK/environment.log
: >"$ENV_LOG"
run_step environment 60 "$ENV_LOG" bash -c "nvidia-smi; $NVCC --version || echo 'nvcc: not found'; $PY - <<'EOF'
import platform, torch
print('python', platform.python_version(), '| torch', torch.__version__, '| torch CUDA', torch.version.cuda)
p = torch.cuda.get_device_properties(0)
print('device', p.name, '| sm', f'{p.major}.{p.minor}', '| SMs', p.multi_processor_count,
      '| memory', round(p.total_memory / 2**30, 1), 'GiB | GPUs', torch.cuda.device_count())
try:
    import triton
    print('triton', triton.__version__)
except ImportError:
    print('triton: not installed')
EOF"
tail -n 4 "$ENV_LOG" | head -n 3
# python -m astrobio (the build report) runs after the build below, into the same log

# --- build (the CUDA kernels are required: ASTROBIO_CUDA=1) ------------------------------------------
BUILD_LOG=$WORK/build.log
: >"$BUILD_LOG"
run_step build 240 "$BUILD_LOG" env ASTROBIO_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" \
  MAX_JOBS="$(nproc)" "$PY" -m pip install --no-build-isolation --no-deps --no-index -e .
BUILD_RC=$?
if ((BUILD_RC == 0)); then
  run_step cuda-kernel-loads 60 "$BUILD_LOG" "$PY" -c \
    "from astrobio import ops; assert ops.has_cuda_kernel(), f'no CUDA kernel: {ops.extension_error()}'"
  BUILD_RC=$?
  "$PY" -m astrobio >>"$ENV_LOG" 2>&1
fi

# --- part "kernels": the GPU tests, then the kernel and model benchmarks ----------------------------
# The 8-bit AdamW's own tests and benchmark run first; the other GPU tests follow, so that a slow
# newcomer cannot use up the budget before them.
TEST_LOG=$WORK/gpu_tests.log
BENCH_LOG=$WORK/benchmarks.log
TRAIN_LOG=$WORK/train_13b.log
: >"$TEST_LOG"
: >"$BENCH_LOG"
: >"$TRAIN_LOG"
pytest_summary() { grep -E "[0-9]+ (passed|failed|errors?|skipped|deselected)|no tests ran" "$TEST_LOG" | tail -n 1 | tr -d '=' | sed 's/^ *//'; }
# optional NAME LIMIT LOG SCRIPT ARGS...: runs a benchmark script when it exists and the build passed
optional() {
  local name=$1 limit=$2 log=$3 script=$4
  shift 4
  if ((BUILD_RC != 0)); then skip "$name" "the build failed"; return; fi
  if [ ! -f "$script" ]; then skip "$name" "$script not found"; return; fi
  run_step "$name" "$limit" "$log" "$PY" "$script" "$@"
}
TEST_RC=0
OTHER_RC=0
if wants kernels; then
  # The benchmarks check every provider against the specification before timing; the long GPU test files
  # run after them, so that a short lease still measures the kernels.
  optional tune-adamw8bit 60 "$BENCH_LOG" benchmarks/tune_adamw8bit_gpu.py --json "$WORK/tune_adamw8bit.json"
  optional bench-adamw8bit 120 "$BENCH_LOG" benchmarks/bench_adamw8bit.py --device cuda --params 512M \
    --providers "${ADAMW8BIT_PROVIDERS:-astrobio CUDA,astrobio CUDA step(found_inf=False),astrobio Triton,torch AdamW fused,bitsandbytes AdamW8bit,torchao AdamW8bit}" \
    --json "$WORK/adamw8bit_gpu.json"
  optional bench-model-small 90 "$BENCH_LOG" benchmarks/bench_model.py --device cuda --model small \
    --batch-size 32 --seq-len 256 --providers eager,eager+proj,fused,fused+compiled,fused+compiled+proj,llama \
    --steps 5 --warmup 2 \
    --json "$WORK/model_small_gpu.json"
  optional bench-model-13b 90 "$BENCH_LOG" benchmarks/bench_model.py --device cuda --model 13b --layers 4 \
    --batch-size 2 --seq-len 2048 --providers eager,fused,fused+compiled,fused+compiled+proj,llama --steps 5 \
    --warmup 2 \
    --json "$WORK/model_13b_gpu.json"
  if ((BUILD_RC == 0)); then
    # the trainer's default on CUDA: fused Triton layers and compiled blocks (summary.json says which ran)
    run_step train-small-fused 120 "$TRAIN_LOG" "$PY" -m astrobio.train --device cuda --model small \
      --pipeline-stages 1 --steps 20 --output-dir "$WORK/run-small-fused"
    # two stages on the one GPU with fused layers: the last stage's chunked loss through its input, the
    # fused plan in the preflight
    run_step train-pp-fused 120 "$TRAIN_LOG" "$PY" -m astrobio.train --device cuda --model small \
      --pipeline-stages 2 --gpu-memory-limit 40GiB --steps 20 --kernels fused --compile on \
      --output-dir "$WORK/run-pp-fused"
    run_step gpu-tests-adamw8bit 240 "$TEST_LOG" "$PY" -m pytest -q -rfEs -p no:cacheprovider \
      tests/test_adamw8bit_gpu.py
    TEST_RC=$?
    ((TEST_RC == 3)) && TEST_RC=0  # skipped (not in GPU_CHECK_STEPS)
    DETAILS[-1]=$(pytest_summary)
    # pytest exits 5 when no other test is marked gpu: nothing failed
    run_step gpu-tests-other 180 "$TEST_LOG" "$PY" -m pytest -q -m gpu -rfEs -p no:cacheprovider \
      --continue-on-collection-errors --ignore=tests/test_adamw8bit_gpu.py tests/
    OTHER_RC=$?
    ((OTHER_RC == 5 || OTHER_RC == 3)) && OTHER_RC=0
    DETAILS[-1]=$(pytest_summary)
  else
    TEST_RC=1
    skip gpu-tests-adamw8bit "the build failed (build.log)"
    skip gpu-tests-other "the build failed"
  fi
fi

# --- part "system": offload, the memory plan, the 13B runs ------------------------------------------
# train13b NAME LIMIT ARGS...: one 13B run with GPU utilization sampled every 0.5 s beside it.
train13b() {
  local name=$1 limit=$2
  shift 2
  if ((BUILD_RC != 0)); then skip "$name" "the build failed"; return; fi
  nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader -lms 500 \
    >"$WORK/$name.smi.csv" 2>/dev/null &
  local smi=$!
  # start-up: seconds from launch to the first line of metrics.jsonl (written after the step-0 evaluation)
  local out=${*: -1} start=$SECONDS
  (while [ ! -s "$out/metrics.jsonl" ]; do sleep 1; done; echo "first metrics line $((SECONDS - start)) s after launch") \
    >"$WORK/$name.startup.txt" 2>/dev/null &
  local poll=$!
  run_step "$name" "$limit" "$TRAIN_LOG" "$PY" -m astrobio.train "$@"
  kill "$smi" "$poll" 2>/dev/null
  DETAILS[-1]="$(cat "$WORK/$name.startup.txt" 2>/dev/null); $(grep -E "^(tokens/s|cuda busy|peak device|peak host|checkpoint save|time) " "$TRAIN_LOG" | tail -n 6 | tr -s ' ' | tr '\n' ';')"
}
if wants system; then
  optional bench-offload-small 70 "$BENCH_LOG" benchmarks/bench_offload.py --model small --micro-batches 8 \
    --batch-size 8 --seq-len 256 --json "$WORK/offload_small_gpu.json"
  # data parallel on the one GPU (two ranks over gloo with CUDA tensors): 2 replicas equal one process
  # with the same global batch; the last line of the step's detail is the largest relative loss difference
  if ((BUILD_RC == 0)); then
    run_step train-dp2-1gpu 120 "$TRAIN_LOG" bash -c "$PY -m astrobio.train --device cuda --pipeline-stages 1 \
      --data-parallel 2 --micro-batch-size 4 --gradient-accumulation-steps 2 --steps 10 --output-dir $WORK/dp2 && \
      $PY -m astrobio.train --device cuda --pipeline-stages 1 --data-parallel 1 --micro-batch-size 4 \
      --gradient-accumulation-steps 4 --steps 10 --output-dir $WORK/dp1 && $PY - $WORK/dp1 $WORK/dp2 <<'EOF'
import json, sys
runs = [{r['step']: r['loss'] for r in map(json.loads, open(d + '/metrics.jsonl')) if 'loss' in r} for d in sys.argv[1:]]
diff = max(abs(runs[0][k] - runs[1][k]) / abs(runs[0][k]) for k in runs[0])
print(f'dp2 vs dp1: {len(runs[0])} logged steps, largest relative loss difference {diff:.2e}')
EOF"
    DETAILS[-1]=$(grep "dp2 vs dp1" "$TRAIN_LOG" | tail -n 1)
  else
    skip train-dp2-1gpu "the build failed"
  fi
  COMMON_13B=(--model 13b --device cuda --use-cpu-offloading --master-weights bf16-sr --accum-dtype bf16
              --use-mixed-precision --use-gradient-checkpointing --seq-len 2048 --micro-batch-size 1
              --eval-every-n-steps 0 --eval-batches 1)
  train13b train-13b-1proc 230 "${COMMON_13B[@]}" --pipeline-stages 1 --gradient-accumulation-steps 16 \
    --steps 3 --output-dir "$WORK/run13b-1proc"
  rm -rf "$WORK/run13b-1proc/checkpoints"  # ~50 GB: the disk holds one
  train13b train-13b-2stage 300 "${COMMON_13B[@]}" --pipeline-stages 2 --gpu-memory-limit 24GiB \
    --gradient-accumulation-steps 8 --steps 2 --output-dir "$WORK/run13b-2stage"
  rm -rf "$WORK/run13b-2stage/checkpoints"
  optional bench-offload-13b 90 "$BENCH_LOG" benchmarks/bench_offload.py --model 13b --layers 4 \
    --micro-batches 8 --batch-size 1 --seq-len 2048 --checkpointing --json "$WORK/offload_13b_gpu.json"
  optional memory-planner 60 "$BENCH_LOG" benchmarks/validate_memory_plan.py --device cuda \
    --json "$WORK/memory_gpu.json"
  GPUS=$(nvidia-smi -L | wc -l)
  if ((GPUS < 2)); then
    skip pipeline-nccl "NCCL needs one GPU per rank; this machine has $GPUS"
  else
    optional pipeline-nccl 90 "$BENCH_LOG" benchmarks/bench_pipeline.py --backend nccl --micro-batches 32 \
      --json "$WORK/pipeline_gpu.json"
  fi
fi

# --- summary: the benchmarks' own tables, then one line per part; everything packed into OUTDIR -------
for part in bench-adamw8bit tune-adamw8bit bench-model-small bench-model-13b bench-offload-small bench-offload-13b; do
  if grep -q "=== $part:.*limit" "$BENCH_LOG"; then
    echo
    echo "--- $part (end of its output) ---"
    sed -n "/=== $part:.*limit/,/=== $part: /p" "$BENCH_LOG" | grep -v "^===" | tail -n 14
  fi
done
{
  echo
  printf '%-20s %-12s %6s  %s\n' part status seconds detail
  for i in "${!NAMES[@]}"; do
    printf '%-20s %-12s %6s  %s\n' "${NAMES[$i]}" "${STATUSES[$i]}" "${TIMES[$i]}" "${DETAILS[$i]}"
  done
  echo "parts: $PARTS; total ${SECONDS}s of a ${BUDGET}s budget; logs in $OUT/results.tar.gz"
} | tee "$WORK/summary.txt"
cp "$WORK/summary.txt" "$OUT/summary.txt"
find "$WORK" -name "*.safetensors" -delete 2>/dev/null
tar -czf "$OUT/results.tar.gz" -C "$WORK" . 2>/dev/null

((BUILD_RC == 0 && TEST_RC == 0 && OTHER_RC == 0)) && exit 0
exit 1
