#!/usr/bin/env bash
# Fills .whl/ (git-ignored) with the wheels benchmarks/gpu_suite.sh installs on a GPU machine that has no
# network: DeepSpeed and the packages it imports that such a machine's image lacks, at the versions
# installed on this machine (the ones the CPU tests ran with), for the GPU machine's Python
# (FASTVL_DEVICE_PYTHON, default 3.12; x86-64 Linux). Run it where pip reaches PyPI and DeepSpeed is
# installed; then send .whl along with the checkout (benchmarks/README.md).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

DEVICE_PYTHON=${FASTVL_DEVICE_PYTHON:-3.12}
PYTHON=${PYTHON:-python3}
# DeepSpeed needs hjson, msgpack, ninja, numpy, packaging, psutil, py-cpuinfo, pydantic, torch, tqdm and
# einops; the GPU image has all but hjson and pydantic (with pydantic-core, annotated-types,
# typing-inspection, and typing-extensions at least as new as pydantic asks for).
PACKAGES=(hjson pydantic pydantic-core annotated-types typing-inspection typing-extensions)

version_here() {
  "$PYTHON" -c "import importlib.metadata, sys; print(importlib.metadata.version(sys.argv[1]))" "$1"
}

rm -rf .whl
mkdir -p .whl
# DeepSpeed is published as a source archive only: build its wheel here. Without DS_BUILD_* variables
# the wheel is pure Python (DeepSpeed compiles its own CUDA ops on first use; fastvl's runs use none).
"$PYTHON" -m pip wheel -q --no-deps --no-build-isolation --wheel-dir .whl "deepspeed==$(version_here deepspeed)"
pins=()
for package in "${PACKAGES[@]}"; do
  pins+=("$package==$(version_here "$package")")
done
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "$DEVICE_PYTHON" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --dest .whl "${pins[@]}"
ls .whl
du -sh .whl
