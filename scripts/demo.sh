#!/usr/bin/env bash
# The main job: load the default model and generate. Extra arguments go to scripts/demo.py.
source "$(dirname "$0")/env.sh"
exec python scripts/demo.py "$@"
