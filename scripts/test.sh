#!/usr/bin/env bash
# Runs the whole test suite on the emulated 8-device CPU mesh. Extra arguments go to pytest.
source "$(dirname "$0")/env.sh"
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
# The suite is mostly XLA compilation, one core per program: two workers (one per core of the 2-core
# machines it runs on), each taking whole files (slowest first: tests/conftest.py) so module fixtures
# compile once. JAXSEEK_TEST_WORKERS=0 runs it in this process.
exec python -m pytest -n "${JAXSEEK_TEST_WORKERS:-2}" --dist loadfile --no-loadscope-reorder "$@"
