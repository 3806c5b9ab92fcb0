# Sourced by scripts/env.sh and scripts/test_gpu_compile.sh: py_ok (a Python >= 3.12 that runs) and
# find_python (the first one found).
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
