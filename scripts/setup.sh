#!/usr/bin/env bash
# Sets everything up on a fresh machine: a virtual environment in .venv, torch 2.14.1, the Python dependencies, the
# package (editable) and the compiled extension (CUDA kernels too when a toolkit is present).
#   H3FUSION_CUDA=0 bash scripts/setup.sh    CPU-only build (much faster to compile)
# A rerun on a set-up checkout is quick: dependencies are reinstalled only when their list changes, and the extension
# is built in place with ninja in a persistent build/ folder, so only changed sources (and what includes a changed
# header) recompile.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
PIP=(.venv/bin/python -m pip install -q)
# drops pip's noise about unreachable local index folders; with pipefail a failing command still fails the script
quiet() { grep -v "^WARNING: Location" || true; }

# ---- dependencies: skipped when this exact list was installed before --------------------------------------------
DEPS_TOOLS=("pip>=23" "setuptools>=64" wheel ninja build)
DEPS_TORCH=("torch==2.14.1")
DEPS_PY=("transformers>=5.0" "peft>=0.14" "accelerate>=1.0" "safetensors>=0.4" "tqdm>=4.60" "matplotlib>=3.7"
  "datasets>=3.0" "pyyaml>=6" "pytest>=8" "pytest-timeout>=2" "hypothesis>=6.100" "pytest-benchmark>=4")
deps_key="$(.venv/bin/python -V 2>&1) ${DEPS_TOOLS[*]} ${DEPS_TORCH[*]} ${DEPS_PY[*]}"
if [ "$(cat .venv/.h3fusion-deps 2>/dev/null)" != "$deps_key" ]; then
  "${PIP[@]}" --upgrade "${DEPS_TOOLS[@]}"
  "${PIP[@]}" "${DEPS_TORCH[@]}"
  "${PIP[@]}" "${DEPS_PY[@]}"
  echo "$deps_key" > .venv/.h3fusion-deps
fi

# ---- the package: Python packages and the `h3fusion` entry point (no compile), again only when pyproject changes --
pkg_key="$(cat pyproject.toml setup.py | sha256sum)"
if [ "$(cat .venv/.h3fusion-pkg 2>/dev/null)" != "$pkg_key" ] || ! .venv/bin/python -c "import h3fusion" 2>/dev/null; then
  H3FUSION_SKIP_EXT=1 "${PIP[@]}" --no-build-isolation -e . 2>&1 | quiet
  echo "$pkg_key" > .venv/.h3fusion-pkg
fi

# ---- the extension: built in place, incrementally ----------------------------------------------------------------
# MAX_JOBS: CUDA compiles need ~4 GB a job; keep to the cores we have.
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
# A changed build configuration (CUDA on/off, architectures, torch) must rebuild even when no source changed.
build_key="${H3FUSION_CUDA:-auto} ${TORCH_CUDA_ARCH_LIST:-default} ${H3FUSION_DEBUG:-0} $(.venv/bin/python -c 'import torch; print(torch.__version__)')"
force=()
if [ "$(cat build/.h3fusion-build 2>/dev/null)" != "$build_key" ]; then
  force=(--force)
fi
.venv/bin/python setup.py -q build_ext --inplace "${force[@]}" 2>&1 | quiet
mkdir -p build && echo "$build_key" > build/.h3fusion-build
.venv/bin/python -c "import h3fusion_ext; print('h3fusion_ext built; CUDA kernels:', h3fusion_ext.has_cuda_kernels())"
