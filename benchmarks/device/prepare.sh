#!/usr/bin/env bash
# Prepare what benchmarks/gpu_mfu.py needs on a GPU machine that has PyTorch but not all of
# Lathe's dependencies and cannot reach a package index or ../shared/data.
#
# Run it here, from the repository root, where pip can reach PyPI:
#   bash benchmarks/device/prepare.sh [DATA_DIR]
# It writes two ignored folders that travel with the working tree:
#   .whl/          wheels for Python 3.12 on x86-64 Linux, at the versions requirements.lock pins
#   .device-data/  pubmed/bc5cdr from DATA_DIR (default ../shared/data)
# docs/benchmarks.md gives the command that runs the benchmark there.
set -euo pipefail

data_dir=${1:-../shared/data}
packages=(pydantic pydantic_core annotated-types typing-inspection obstore transformers)

pins=()
for name in "${packages[@]}"; do
    pin=$(grep -i -E "^${name//[-_]/[-_]}==" requirements.lock || true)
    if [ -z "$pin" ]; then
        echo "prepare.sh: $name is not pinned in requirements.lock." >&2
        exit 1
    fi
    pins+=("$pin")
done

rm -rf .whl .device-data
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl "${pins[@]}"
mkdir -p .device-data/pubmed
cp -r "$data_dir/pubmed/bc5cdr" .device-data/pubmed/
echo "Wrote .whl ($(du -sh .whl | cut -f1)) and .device-data ($(du -sh .device-data | cut -f1))."
