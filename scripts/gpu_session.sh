#!/usr/bin/env bash
# What a lent GPU machine runs, prepared so that scarce device time goes to measuring, not to setting up:
#   scripts/gpu_session.sh tests  OUT   the test suite with the GPU present (device-dependent paths included)
#   scripts/gpu_session.sh bench  OUT   the one-command GPU benchmark (benchmarks/README.md), table written to OUT
# Packages the machine's Python lacks travel as wheels in .whl/ (benchmarks/README.md says which rows need which).
set -uo pipefail
cd "$(dirname "$0")/.."
WHAT=${1:-bench}
OUT=${2:-outputs/gpu}
PY=${PY:-python3}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
case "$WHAT" in
  # the whole log comes back as one file (a failure's traceback too); the tail is what the caller sees at once
  tests) $PY -m pytest -q -n "${WORKERS:-12}" --tb=short -p no:cacheprovider > "$OUT/tests.txt" 2>&1
         rc=$?; tail -60 "$OUT/tests.txt"; exit $rc ;;
  bench) $PY -m benchmarks.run_all --device cuda --only "${ONLY:-train,epoch,infer,video,demo}" --out-dir "$OUT" ;;
  *) echo "usage: scripts/gpu_session.sh tests|bench OUT_DIR" >&2; exit 2 ;;
esac
