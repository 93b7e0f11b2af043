#!/usr/bin/env bash
# One command for a short slot on a GPU machine: goals first, then correctness, then reports.
#
#   bash benchmarks/gpu_check.sh COMMIT      (from anywhere; runs from the repository root)
#
# COMMIT names the code measured (a copy without .git cannot tell); default $COMMIT or "unknown".
# Needs only a python with torch + triton + pytest and a CUDA device; installs nothing.
# Logs and CSV go to $OUT when it is set, else to benchmarks/results/gpu_check/.
# Fails at once without a visible CUDA device. Steps, each bounded by `timeout` (540 s in all):
#   0. the CUDA probe and the machine's versions (20 s).
#   1. benchmarks/gpu_goals.py (200 s): shape A at K = 256 and 512, forward and forward+backward,
#      eager and in a CUDA graph, each checked against float64 before it is timed; one CSV row
#      per measurement, written at once; transient memory.
#   2. pytest -m gpu (240 s, without -x: every failure is listed): correctness at real sizes.
#   3. the row-sparse optimizer step at 1M classes (40 s; a CSV row per measurement, written at once).
#   4. the kernel report for sm_90 with the machine's triton (40 s).
# The last lines are one PASS/FAIL per goal (forward <= 85 us, forward+backward <= 350 us,
# transient memory <= 64 MB at shape A).
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python3}"
COMMIT="${1:-${COMMIT:-unknown}}"
LOGS="${OUT:-benchmarks/results/gpu_check}"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# tests/conftest.py defaults TRITON_INTERPRET to 1 (CPU CI); here the kernels must be compiled.
export TRITON_INTERPRET=0

if ! timeout 10 "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check: no CUDA device is visible; nothing run" >&2
    exit 2
fi

mkdir -p "$LOGS"
status=0
{
    echo "commit $COMMIT"
    timeout 5 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv || true
    timeout 5 "$PY" -c 'import sys, torch, triton; print("python", sys.version.split()[0], "torch", torch.__version__, "triton", triton.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name())'
} 2>&1 | tee "$LOGS/env.txt"

echo "== 1. goals at shape A"
timeout 200 "$PY" benchmarks/gpu_goals.py --csv "$LOGS/goals.csv" --commit "$COMMIT" 2>&1 | tee "$LOGS/goals.log" || status=1

echo "== 2. pytest -m gpu"
timeout 240 "$PY" -m pytest tests/test_gpu.py tests/test_optim.py -m gpu -q -rA -p no:cacheprovider --durations=5 \
    2>&1 | tee "$LOGS/pytest_gpu.log" || status=1

echo "== 3. row-sparse optimizer step"
timeout 40 "$PY" -m benchmarks.bench_optim --device cuda 2> "$LOGS/optim.log" | tee "$LOGS/optim.csv" || status=1

echo "== 4. kernel report (sm_90, 16-bit kernels)"
timeout 40 "$PY" benchmarks/kernel_report.py --arch 90 --filter 16 --json "$LOGS/kernel_report.jsonl" \
    2>&1 | tee "$LOGS/kernel_report.txt" || status=1

echo "== gpu_check finished with status $status (logs in $LOGS)"
grep -E '^(PASS|FAIL) ' "$LOGS/goals.log" || echo "FAIL goals: gpu_goals.py printed no verdict"
exit "$status"
