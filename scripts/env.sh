# Sourced by scripts/demo.sh and scripts/test.sh: makes .venv and installs jaxseek into it on first
# use (again whenever pyproject.toml changes), then activates it.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

# jaxseek pins jax 0.11.2, the version the GPU machines run, which needs Python >= 3.12 (the GPU
# machines run 3.12, so 3.12 comes first). Take $PYTHON if given, else the first candidate that
# runs and is new enough: pyenv's shims refuse a version that is not the global one unless
# PYENV_VERSION names it, so each installed 3.12+ is tried that way too.
py_ok() { "$@" -c 'import sys; sys.exit(sys.version_info < (3, 12))' >/dev/null 2>&1; }
find_python() {
  if [ -n "${PYTHON:-}" ]; then
    py_ok "$PYTHON" && { echo "$PYTHON"; return; }
    echo "[jaxseek] PYTHON=$PYTHON is not a Python >= 3.12 that runs" >&2; return 1
  fi
  local c v
  for c in python3.12 python3 python3.13; do
    command -v "$c" >/dev/null && py_ok "$c" && { echo "$c"; return; }
  done
  if command -v pyenv >/dev/null; then
    for v in $(pyenv versions --bare 2>/dev/null | grep -E '^3\.(1[2-9]|[2-9][0-9])' | sort -V); do
      c="$(PYENV_VERSION=$v pyenv which python3 2>/dev/null)" && py_ok "$c" && { echo "$c"; return; }
    done
  fi
  echo "[jaxseek] no Python >= 3.12 found: install one (e.g. 'pyenv install 3.12' or your distribution's python3.12) or set PYTHON=/path/to/python3.12" >&2
  return 1
}

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
