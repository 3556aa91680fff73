#!/usr/bin/env bash
# Sets everything up on a fresh machine: a virtual environment in .venv, torch 2.14.1, the Python
# dependencies, and an editable build of the extension (CUDA kernels too when a toolkit is present).
#   H3FUSION_CUDA=0 bash scripts/setup.sh    CPU-only build (much faster to compile)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
.venv/bin/python -m pip install -q --upgrade "pip>=23" "setuptools>=64" wheel ninja
.venv/bin/python -m pip install -q "torch==2.14.1"
.venv/bin/python -m pip install -q "transformers>=5.0" "peft>=0.14" "accelerate>=1.0" "safetensors>=0.4" \
  "tqdm>=4.60" "matplotlib>=3.7" "datasets>=3.0" "pytest>=8" "hypothesis>=6.100" "pytest-benchmark>=4"
# MAX_JOBS: CUDA compiles need ~4 GB a job; keep to the cores we have.
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
.venv/bin/python -m pip install -q --no-build-isolation -e . 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import h3fusion_ext, h3fusion; print('h3fusion_ext built; CUDA kernels:', h3fusion_ext.has_cuda_kernels())"
