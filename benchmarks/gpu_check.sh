#!/usr/bin/env bash
# GPU check: the seed's training loop vs the path `sweeper worker` trains on, on one NVIDIA GPU, in 8 minutes.
#
#   bash benchmarks/gpu_check.sh LOGDIR [--dry-run-cpu] [--budget SECONDS]
#
# Needs Python with PyTorch and torchvision only (no install: PYTHONPATH is set to this checkout;
# no network, no Optuna, no MLflow; synthetic CIFAR-shaped images). Writes the full log to
# LOGDIR/gpu_check.log and every figure to LOGDIR/gpu_check.json, rewritten after each phase (a
# run cut short keeps what it measured); the table comes last on stdout.
# Exit status: 0 done, 2 no CUDA GPU, 3 Python/PyTorch/torchvision missing, 124 stopped at the
# overall time limit (GPU_CHECK_TIMEOUT seconds, default 465; with the 10 s grace to a kill, 8 minutes), otherwise the script's own status.
set -uo pipefail

if [ $# -lt 1 ] || [ "${1#-}" != "$1" ]; then
    echo "usage: bash benchmarks/gpu_check.sh LOGDIR [--dry-run-cpu] [--budget SECONDS]" >&2
    exit 64
fi
LOGDIR=$1
shift
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
LIMIT=${GPU_CHECK_TIMEOUT:-465}

mkdir -p "$LOGDIR" || { echo "gpu_check: cannot create $LOGDIR" >&2; exit 64; }
LOG="$LOGDIR/gpu_check.log"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# compiled kernels are shared by the packed processes through this cache
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$LOGDIR/inductor-cache}

{
    echo "gpu_check: $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname), repo $REPO, python $("$PYTHON" --version 2>&1)"
    if command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi --query-gpu=name,memory.total,driver_version,utilization.gpu --format=csv 2>&1 || true
    else
        echo "gpu_check: nvidia-smi not found"
    fi
} >"$LOG" 2>&1
cat "$LOG" >&2

if ! command -v "$PYTHON" >/dev/null 2>&1; then
    echo "gpu_check: $PYTHON not found; set PYTHON=/path/to/python (with PyTorch and torchvision)" | tee -a "$LOG" >&2
    exit 3
fi

# stdout (the table) and stderr (progress) both go to the log; the table stays on stdout
if command -v timeout >/dev/null 2>&1; then
    timeout --signal=TERM --kill-after=10 "$LIMIT" "$PYTHON" "$REPO/benchmarks/gpu_check.py" --logdir "$LOGDIR" "$@" \
        2> >(tee -a "$LOG" >&2) | tee -a "$LOG"
    status=${PIPESTATUS[0]}
else
    "$PYTHON" "$REPO/benchmarks/gpu_check.py" --logdir "$LOGDIR" "$@" 2> >(tee -a "$LOG" >&2) | tee -a "$LOG"
    status=${PIPESTATUS[0]}
fi
wait  # the stderr tee
if [ "$status" -eq 124 ]; then
    echo "gpu_check: stopped at the ${LIMIT}s limit; the phases that finished are in $LOG" | tee -a "$LOG" >&2
fi
exit "$status"
