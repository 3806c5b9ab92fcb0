# Sourced by scripts/demo.sh and scripts/test.sh: makes .venv and installs jaxseek into it on first
# use (again whenever pyproject.toml changes), then activates it.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

# py_ok, find_python: a Python >= 3.12 (jax 0.11.2 needs it)
source "$ROOT/scripts/find_python.sh"

if [ -x .venv/bin/python ] && ! py_ok .venv/bin/python; then
  echo "[jaxseek] .venv holds $(.venv/bin/python --version 2>&1); jaxseek needs >= 3.12: recreating it" >&2
  rm -rf .venv
fi
if [ ! -x .venv/bin/python ]; then
  PY="$(find_python)"
  echo "[jaxseek] creating .venv with $("$PY" --version) ($PY)" >&2
  "$PY" -m venv .venv
fi
stamp=".venv/.jaxseek-$(sha1sum pyproject.toml | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  echo "[jaxseek] installing jaxseek and its test tools into .venv (first run: a few minutes)" >&2
  .venv/bin/python -m pip install -q --upgrade pip >&2
  .venv/bin/python -m pip install -q -e ".[test]" >&2
  rm -f .venv/.jaxseek-*
  touch "$stamp"
fi
# shellcheck disable=SC1091
source .venv/bin/activate
# 8 emulated CPU devices for the mesh; PJRT_NPROC keeps their collectives from deadlocking
# (docs/DESIGN_NOTES.md).
export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=8"
export PJRT_NPROC="${PJRT_NPROC:-16}"
