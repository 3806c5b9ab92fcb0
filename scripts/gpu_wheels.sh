#!/usr/bin/env bash
# Downloads (here, where pip reaches a registry) the wheels that scripts/gpu_session.sh installs on a GPU
# machine that has jax 0.11.2 + CUDA but no registry: flax 0.12.12 (0.12.8 fails to import on jax 0.11.2)
# and tokamax 0.0.17 with the dependencies that machine lacks (docs/KERNELS.md). ~38 MB, into .whl/
# (ignored by git; name it in the device call's `carry`).
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="${PIP:-python3 -m pip}"
mkdir -p .whl
WHEELS=(
  flax==0.12.12
  tokamax==0.0.17 qwix==0.1.8 einshape==1.0 immutabledict==4.3.1 tensorboardX==2.6.5 xprof==2.24.2
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 fire==0.7.1 termcolor==3.3.0
)
$PIP download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${WHEELS[@]}"
du -sh .whl
