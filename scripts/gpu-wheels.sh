#!/usr/bin/env bash
# Fetch, hash-checked, the wheels scripts/gpu_validate.py needs on the GPU machine (which
# reaches no package index) into build/gpu-wheels/ (git-ignored). Carry that folder with
# the working tree, e.g. carry=["build/gpu-wheels"]. Only pynvml is needed: the agent
# and the validation script are standard library and run from the tree; torch is the
# GPU machine's own.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-build/gpu-wheels}
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
# The version the unit tests run against (pyproject: nvidia-ml-py>=12).
NVML_REQ="nvidia-ml-py==13.615.71 --hash=sha256:959bf4adf6fe1308e4bd739e722236b0d1ec8392e2cefad33ff70c311380b9b6"
mkdir -p "$DEST"
req=$(mktemp)
trap 'rm -f "$req"' EXIT
echo "$NVML_REQ" > "$req"
"$PY" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
  --require-hashes -r "$req" -d "$DEST"
(cd "$DEST" && sha256sum ./*.whl > SHA256SUMS && cat SHA256SUMS)
