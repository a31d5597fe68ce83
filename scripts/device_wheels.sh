#!/usr/bin/env bash
# Download the Python 3.12 x86-64 wheels that a bare GPU machine lacks into .whl/
# (git-ignored), pinned to the versions this project is tested with. Run here, where PyPI is
# reachable; on the GPU machine, install them without network and use the project from source:
#
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
#   export PYTHONPATH=/tmp/site:$PWD
#
# scripts/gpu_benchmark.sh does both before it benchmarks.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=.whl
mkdir -p "$dest"
python3 -m pip download --quiet --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 -d "$dest" \
    opacus==1.6.0 segmentation-models-pytorch==0.6.0 dp-accounting==0.6.0 dm-tree==0.1.10 \
    albumentations==2.0.8 albucore==0.0.24 pydantic==2.14.3 pydantic-core==2.50.4 \
    annotated-types==0.8.0 typing-inspection==0.4.5 stringzilla==5.3.2 simsimd==6.5.16
ls -1 "$dest"
du -sh "$dest"
