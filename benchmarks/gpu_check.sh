#!/usr/bin/env bash
# One-GPU check of scdlkit's CUDA paths, in under 8 minutes on an H100/H200: bf16 embedding
# cells/s at 1,200 tokens and at realistic lengths with the model FLOP utilisation, full
# fine-tuning and LoRA training cells/s, peak GPU memory, and bf16-vs-fp32 parity on the test
# fixture. Prints one markdown table (see benchmarks/gpu_check.py for what each row measures).
#
#   bash benchmarks/gpu_check.sh              # on a machine with an NVIDIA GPU and CUDA torch
#   bash benchmarks/gpu_check.sh --dry-run    # tiny model on the CPU: checks the script itself
#
# Extra arguments go to gpu_check.py (--device cuda:1, --cells N, --batch-size N, ...).
# PYTHON selects the interpreter (default: .venv/bin/python, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3

for arg in "$@"; do
    if [ "$arg" = "--dry-run" ]; then
        exec "$PY" benchmarks/gpu_check.py "$@"
    fi
done

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "gpu_check: no NVIDIA GPU visible (nvidia-smi); use --dry-run to test the script." >&2
    exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' || {
    echo "gpu_check: this torch has no CUDA ($("$PY" -c 'import torch; print(torch.__version__)'))." >&2
    exit 2
}
# a hard cap, so a hung kernel cannot hold the machine: 8 minutes
exec timeout --signal=TERM --kill-after=10 480 "$PY" benchmarks/gpu_check.py "$@"
