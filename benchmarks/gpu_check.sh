#!/usr/bin/env bash
# The GPU check in one command (issue 19), for a CUDA machine that has torch + lightning but neither network
# nor monai/hydra: installs the carried wheels, runs the CUDA tests, then benchmarks/gpu_check.py.
#
#   benchmarks/gpu_check.sh --prepare      # once, on a machine with network, in the checkout:
#                                          #   .bench/ <- ../shared/bench/monai_bench.py (the stock-MONAI baselines)
#                                          #   .whl/   <- the wheels the GPU machine lacks (pip download, ~17 MB)
#   benchmarks/gpu_check.sh RESULTS_DIR [gpu_check.py options]   # on the GPU machine, .whl/ and .bench/ carried
#
# RESULTS_DIR receives gpu_check.md, gpu_check.json, test_cuda.log and gpu_check.log (nothing else: the
# stage runs stay in $GPU_CHECK_WORK, default /tmp/gpu_check). GPU_CHECK_BUDGET_S (default 480) bounds the
# whole script: the CUDA tests' time is taken off gpu_check.py's --budget-s.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)

if [[ "${1:-}" == "--prepare" ]]; then
    PY=${PYTHON:-python3}
    mkdir -p .bench .whl
    cp "${MONAI_BENCH:-../shared/bench/monai_bench.py}" .bench/
    # Pure-Python wheels for the GPU machine's Python 3.12 (torch, lightning, numpy, scipy, scikit-learn,
    # pandas, einops, matplotlib, torchmetrics, PyYAML are already there). wandb is not needed: logger=csv.
    "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl monai==1.6.1 hydra-core==1.3.8 omegaconf==2.3.1 nibabel==5.4.2 nilearn==0.14.1
    # antlr4 4.9.3 (what hydra 1.3 pins) is published as an sdist only: build its pure-Python wheel here.
    "$PY" -m pip wheel --no-deps -w .whl antlr4-python3-runtime==4.9.3
    du -ch .whl/*.whl .bench/* | tail -1
    exit 0
fi

results=${1:?usage: benchmarks/gpu_check.sh RESULTS_DIR [gpu_check.py options] | --prepare}
shift
mkdir -p "$results"
work=${GPU_CHECK_WORK:-/tmp/gpu_check}
budget=${GPU_CHECK_BUDGET_S:-480}
ls .whl/*.whl >/dev/null 2>&1 || { echo "gpu_check.sh: no wheels in .whl/ (run --prepare, carry .whl)" >&2; exit 2; }
[[ -f .bench/monai_bench.py ]] || echo "gpu_check.sh: no .bench/monai_bench.py: the baselines will be skipped" >&2

site=${GPU_CHECK_SITE:-/tmp/mrrl-site}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
export PYTHONPATH="$PWD:$site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

# The CUDA correctness tests first (a failure is reported, the measurements still run).
set +e
timeout 120 python3 -m pytest tests/test_cuda.py -q -rs -p no:cacheprovider 2>&1 | tee "$results/test_cuda.log"
tests_rc=${PIPESTATUS[0]}
left=$((budget - ($(date +%s) - start)))
python3 benchmarks/gpu_check.py --device cuda --out "$work" --budget-s "$left" "$@" 2>&1 | tee "$results/gpu_check.log"
check_rc=${PIPESTATUS[0]}
set -e
cp "$work/gpu_check.md" "$work/gpu_check.json" "$results/" 2>/dev/null || true
echo "gpu_check.sh: tests/test_cuda.py exit $tests_rc, gpu_check.py exit $check_rc, $(($(date +%s) - start)) s"
exit $((tests_rc != 0 || check_rc != 0))
