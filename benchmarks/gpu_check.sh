#!/usr/bin/env bash
# One command for the GPU machine: GPU tests + kernel report + timings of shape A and a sweep.
#
#   bash benchmarks/gpu_check.sh            (from anywhere; runs from the repository root)
#
# Needs only a python with torch + triton + pytest and a CUDA device; installs nothing.
# Logs and CSV go to $OUT when it is set, else to benchmarks/results/gpu_check/.
# Steps (each bounded by `timeout`, < 8 minutes in all): environment, kernel report (sm_90),
# pytest -m gpu (correctness at real sizes incl. shape A vs float64, NaN/inf inputs,
# determinism, no host sync, memory, torch.compile, autocast, a whole training step under
# set_sync_debug_mode("error") and replayed in a CUDA graph), then benchmarks/bench_triton.py;
# the timing table prints last.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python3}"
LOGS="${OUT:-benchmarks/results/gpu_check}"
mkdir -p "$LOGS"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# tests/conftest.py defaults TRITON_INTERPRET to 1 (CPU CI); here the kernels must be compiled.
export TRITON_INTERPRET=0

status=0

echo "== environment" | tee "$LOGS/env.txt"
{
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv || true
    "$PY" -c 'import sys, torch, triton; print("python", sys.version.split()[0], "torch", torch.__version__, "triton", triton.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name() if torch.cuda.is_available() else None)'
    git rev-parse --short HEAD 2>/dev/null || echo "no git commit"
} 2>&1 | tee -a "$LOGS/env.txt"

echo "== kernel report (sm_90, 16-bit kernels)"
timeout 120 "$PY" benchmarks/kernel_report.py --arch 90 --filter 16 --json "$LOGS/kernel_report.jsonl" \
    2>&1 | tee "$LOGS/kernel_report.txt" || status=1

echo "== pytest -m gpu"
timeout 300 "$PY" -m pytest tests/test_gpu.py -m gpu -q -x -rA -p no:cacheprovider --durations=5 \
    2>&1 | tee "$LOGS/pytest_gpu.log" || status=1

echo "== timings"
timeout 240 "$PY" benchmarks/bench_triton.py --csv "$LOGS/bench.csv" 2>&1 | tee "$LOGS/bench.log" || status=1

echo "== gpu_check finished with status $status (logs in $LOGS)"
exit "$status"
