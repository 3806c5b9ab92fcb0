#!/usr/bin/env bash
# Runs the whole test suite on the emulated 8-device CPU mesh. Extra arguments go to pytest.
source "$(dirname "$0")/env.sh"
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
# The suite is mostly XLA compilation, one core per program: two workers (one per core of the 2-core
# machines it runs on), each taking whole files (slowest first: tests/conftest.py) so module fixtures
# compile once. JAXSEEK_TEST_WORKERS=0, or -s (workers' output would not reach the terminal), runs it
# in this process.
workers="${JAXSEEK_TEST_WORKERS:-2}"
for arg in "$@"; do
  if [ "$arg" = "-s" ] || [ "$arg" = "--capture=no" ]; then workers=0; fi
done
if [ "$workers" = 0 ]; then
  exec python -m pytest "$@"
fi
exec python -m pytest -n "$workers" --dist loadfile --no-loadscope-reorder "$@"
