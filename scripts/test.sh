#!/usr/bin/env bash
# Runs the whole test suite on the emulated 8-device CPU mesh. Extra arguments go to pytest.
source "$(dirname "$0")/env.sh"
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
exec python -m pytest "$@"
