#!/usr/bin/env bash
# The release path, as users take it: build the source distribution, install it (CPU-only) into a fresh virtual
# environment outside the source tree, and run the installed command there: `h3fusion --help` and the quick kernel
# benchmarks. Run after scripts/setup.sh (it uses .venv to build the sdist). CI runs it (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
WORK=$(mktemp -d "${TMPDIR:-/tmp}/h3fusion-sdist.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
export PIP_DISABLE_PIP_VERSION_CHECK=1
quiet() { grep -v "^WARNING: Location" || true; }

.venv/bin/python -m build --sdist --no-isolation --outdir "$WORK/dist" . 2>&1 | tail -1
SDIST=$(ls "$WORK"/dist/h3fusion_ext-*.tar.gz)
# every C++/CUDA header the build includes must be in the archive (a missing one fails the CUDA build only on GPU
# machines otherwise)
tar -tzf "$SDIST" | sed 's|^[^/]*/||' | sort > "$WORK/listing.txt"
missing=$(git ls-files 'csrc/*' | sort | comm -23 - "$WORK/listing.txt")
if [ -n "$missing" ]; then echo "sdist lacks: $missing" >&2; exit 1; fi

python3 -m venv "$WORK/venv"
"$WORK/venv/bin/python" -m pip install -q "setuptools>=64" wheel ninja "torch==2.14.1" 2>&1 | quiet
H3FUSION_CUDA=0 "$WORK/venv/bin/python" -m pip install -q --no-build-isolation "$SDIST" 2>&1 | quiet
cd "$WORK"  # outside the source tree: nothing may import from it
TIMEFORMAT='installed `h3fusion --help`: %R s'
time "$WORK/venv/bin/h3fusion" --help > /dev/null
"$WORK/venv/bin/h3fusion" bench --quick --device cpu --out "$WORK/bench.json"
"$WORK/venv/bin/python" - "$WORK/bench.json" <<'PY'
import json, sys
data = json.load(open(sys.argv[1]))
assert data, "empty benchmark results"
print("sdist install OK:", ", ".join(sorted(data)) if isinstance(data, dict) else f"{len(data)} results")
PY
