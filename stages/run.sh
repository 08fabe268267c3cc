#!/bin/sh
# The interpreter of every DVC stage, whatever the caller's shell has activated:
#   1. FMNIST_PYTHON, when set (an interpreter of your own);
#   2. the project's .venv made by `make setup`, found in the repository DVC runs for:
#      DVC_ROOT, which for a queued experiment is the repository that queued it, not the
#      temporary copy it runs in;
#   3. else python3 on PATH (an activated venv, or the conda environment of conda.yaml).
# PYTHONPATH=src: a stage runs the library of the copy it runs in, so a queued experiment runs
# the code it was queued with even if the workspace's src/ has changed since.
set -eu
root=${DVC_ROOT:-$(pwd)}
if [ -n "${FMNIST_PYTHON:-}" ]; then
  py=$FMNIST_PYTHON
elif [ -x "$root/.venv/bin/python" ]; then
  py=$root/.venv/bin/python
else
  py=$(command -v python3 || command -v python || true)
fi
if [ -z "$py" ] || ! "$py" -c 'import importlib.util as u, sys; sys.exit(not all(u.find_spec(m) for m in ("torch", "mlflow", "yaml")))' 2>/dev/null; then
  echo "error: no Python with the project's packages: ${py:-none found} lacks torch, mlflow or" \
       "pyyaml. Run \`make setup\` in $root (it creates .venv), or set FMNIST_PYTHON." >&2
  exit 2
fi
# glibc's malloc hands blocks over 128 KiB (adaptively more) back to the kernel with munmap, and
# a training step allocates and frees many such tensors: each comes back as fresh pages, page
# fault by page fault. Serving blocks up to 32 MiB from the heap and keeping freed memory made a
# bfloat16 epoch of the recipe 11-22% shorter in two same-run profiles here (docs/accuracy.md,
# "The allocator"). Other C libraries ignore the variable; a GLIBC_TUNABLES of your own wins.
export GLIBC_TUNABLES="${GLIBC_TUNABLES-glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=4294967296}"
PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" exec "$py" "$@"
