#!/usr/bin/env bash
# The CUDA paths a CPU machine never runs, checked in one go on a machine with a GPU (about
# 3-5 minutes on one GPU): the default pipeline's train stage on a slice on CUDA, twice,
# bit for bit; the accuracy recipe for a few epochs with float16 AMP and its gradient scaler;
# torchrun with nccl on the GPUs present; training images/s on CUDA against the CPU.
# Prints a summary and writes it as JSON (default reports/bench/gpu_check.json).
#
#   bash benchmarks/gpu_check.sh [--out FILE] [--limit N] [--epochs N]
#
# Without CUDA it stops at once with exit 3 and one line saying so.
set -eu
cd "$(dirname "$0")/.."
python=.venv/bin/python
if [ ! -x "$python" ]; then
  echo "error: no .venv here; run make setup first" >&2
  exit 2
fi
if ! "$python" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "error: no CUDA device: torch.cuda.is_available() is False on this machine" \
       "(torch $("$python" -c 'import torch; print(torch.__version__)')); run this on a machine" \
       "with an NVIDIA GPU" >&2
  exit 3
fi
PYTHONPATH=src exec "$python" benchmarks/gpu_check.py "$@"
