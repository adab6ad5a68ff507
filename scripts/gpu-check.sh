#!/usr/bin/env bash
# The GPU checks: the tests marked `gpu` and the GPU figures of `conveyor bench spa-preprocess`.
#
# On a GPU node with Conveyor installed (pip install -e .[gpu]):
#     bash scripts/gpu-check.sh [OUT_DIR] [all|tests|bench]
# On a bare CUDA machine with python3, numpy, scipy, pandas, h5py, matplotlib, cupy and
# pytest but not Conveyor's other dependencies, fetch those first where pip can reach PyPI
# (they are then read from .whl/ in the repository):
#     bash scripts/gpu-check.sh --fetch-wheels        # here, with internet
#     bash scripts/gpu-check.sh OUT_DIR               # there
#
# Writes OUT_DIR/gpu-tests.log, OUT_DIR/gpu-bench.json and OUT_DIR/gpu-bench.txt (default
# OUT_DIR: gpu-check/). The benchmark runs the native steps alone on a 4096 x 4096 x 40
# movie (RELION's figures are the CPU benchmark's). Put its table in docs/benchmarks.md with
# the machine's GPU model (the report's `device`).
set -euo pipefail
cd "$(dirname "$0")/.."

# Conveyor's dependencies that a CUDA image of the usual scientific stack lacks (their own
# dependencies -- attrs, numpy, pandas, pyarrow, typing-extensions -- it has)
WHEELS="mrcfile starfile tifffile jsonschema jsonschema-specifications referencing rpds-py"

if [[ "${1:-}" == "--fetch-wheels" ]]; then
    py="${PYTHON_VERSION:-3.12}"
    mkdir -p .whl
    python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "$py" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl $WHEELS
    echo "wheels for Python $py in .whl/: $(ls .whl | tr '\n' ' ')"
    exit 0
fi

out="${1:-gpu-check}"
what="${2:-all}"   # tests or bench alone, where one command may run ten minutes at most
case "$what" in all|tests|bench) ;; *) echo "gpu-check: second argument: all, tests or bench" >&2; exit 2;; esac
mkdir -p "$out"
py=python3
if ! "$py" -c "import conveyor" 2>/dev/null || ! "$py" -c "import mrcfile, starfile" 2>/dev/null; then
    if compgen -G ".whl/*.whl" >/dev/null; then
        site="$(mktemp -d)"
        "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .whl/*.whl
        export PYTHONPATH="$PWD:$site${PYTHONPATH:+:$PYTHONPATH}"
    else
        export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    fi
fi
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg

"$py" - <<'EOF'
from conveyor import backend
if not backend.gpu_available():
    raise SystemExit("gpu-check: cupy does not import or sees no CUDA device here; run this on a GPU machine")
backend.set_device("gpu")
print("device:", backend.describe())
EOF

status=0
if [[ "$what" != bench ]]; then
    "$py" -m pytest -q -p no:cacheprovider -m gpu tests/ 2>&1 | tee "$out/gpu-tests.log" || status=$?
fi
if [[ "$what" != tests ]]; then
    "$py" -m conveyor --device gpu bench spa-preprocess --no-relion --repeat 3 --out "$out/gpu-bench.json" \
        2>&1 | tee "$out/gpu-bench.txt" || status=$?
fi
exit "$status"
