#!/usr/bin/env bash
# The GPU program's structure, checked on this CPU machine: tests/gpu_compile compile the small-scale
# decode and prefill steps and the kernels at DeepSeek's shapes for an H100 (deviceless AOT:
# scripts/compile_gpu.py) and assert no weight-slice copies, no dequantised FP8 weights, the Mosaic
# kernels in the program and no spills. Makes .venv-gpu on first use (jax's CUDA plugin and ptxas, about
# 1.6 GB), and again whenever its requirements change. Extra arguments go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
source scripts/find_python.sh
VENV=.venv-gpu
if [ -x "$VENV/bin/python" ] && ! py_ok "$VENV/bin/python"; then
  echo "[jaxseek] $VENV holds $("$VENV/bin/python" --version 2>&1); jaxseek needs >= 3.12: recreating it" >&2
  rm -rf "$VENV"
fi
if [ ! -x "$VENV/bin/python" ]; then
  PY="$(find_python)"
  echo "[jaxseek] creating $VENV with $("$PY" --version) ($PY)" >&2
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.jaxseek-$(cat pyproject.toml scripts/gpu-compile.txt | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  echo "[jaxseek] installing jaxseek, jax's CUDA plugin and ptxas into $VENV (first run: a few minutes)" >&2
  "$VENV/bin/python" -m pip install -q --upgrade pip >&2
  "$VENV/bin/python" -m pip install -q -e ".[gpu]" -r scripts/gpu-compile.txt >&2
  rm -f "$VENV"/.jaxseek-*
  touch "$stamp"
fi
# JAX_PLATFORMS=cpu: the CUDA plugin compiles for a GPU target without looking for a driver. The suite's
# tests/conftest.py (8 emulated CPU devices, LLVM -O0) is not this suite's: --confcutdir stops at ours.
export JAX_PLATFORMS=cpu
exec "$VENV/bin/python" -m pytest tests/gpu_compile --confcutdir=tests/gpu_compile -p no:cacheprovider "$@"
