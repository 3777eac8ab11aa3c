#!/usr/bin/env bash
# One check for a GPU (or TPU) machine without network access, in under 8 minutes:
#   1. device, versions and date;
#   2. the test suite on the accelerator (tests whose packages are missing, such as
#      tensorflow-datasets, scikit-learn or matplotlib, are skipped and listed);
#   3. the CelebA rows of perf/step_time.py at batch 32 and 256, with the PyTorch
#      reference step on the same device.
# Everything goes to one log: $OUT/device_check.log when $OUT is set, else
# ./device_check.log. Needs python3 with jax (CUDA), flax, optax, chex, scipy, pytest and,
# for the reference rows, torch; nothing is installed.
#
#   bash perf/device_check.sh
#   DEVICE_CHECK_QUICK=1 bash perf/device_check.sh   # minutes on a CPU: a few test
#       files, and LS and NTKMTL-SR on the CelebA network at batch 8, to try the script
#
# Other knobs: PYTHON (default python3), DEVICE_CHECK_TEST_SECONDS and
# DEVICE_CHECK_BENCH_SECONDS (time limits of steps 2 and 3), DEVICE_CHECK_TESTS (pytest
# arguments instead of the whole suite), DEVICE_CHECK_HIDE (space-separated modules to make
# unimportable, to rehearse a machine that lacks them).
set -u

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-python3}
QUICK=${DEVICE_CHECK_QUICK:-0}
if [ -n "${OUT:-}" ]; then LOG=$OUT/device_check.log; else LOG=$ROOT/device_check.log; fi
mkdir -p "$(dirname "$LOG")"
exec > >(tee "$LOG") 2>&1

export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
# pytest workers and the PyTorch reference share the accelerator with the jax process.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
if [ -n "${DEVICE_CHECK_HIDE:-}" ]; then
  HIDE_DIR=$(mktemp -d)
  for module in $DEVICE_CHECK_HIDE; do
    mkdir -p "$HIDE_DIR/$module"
    echo "raise ModuleNotFoundError('$module hidden by DEVICE_CHECK_HIDE', name='$module')" \
      > "$HIDE_DIR/$module/__init__.py"
  done
  export PYTHONPATH=$HIDE_DIR:$PYTHONPATH
fi

START=$(date +%s)
section() { echo; echo "=== $* (at $(( $(date +%s) - START )) s) ==="; }

if [ "$QUICK" = 1 ]; then
  TEST_SECONDS=${DEVICE_CHECK_TEST_SECONDS:-300}
  BENCH_SECONDS=${DEVICE_CHECK_BENCH_SECONDS:-300}
  TESTS=${DEVICE_CHECK_TESTS:-"tests/test_metrics.py tests/test_report.py tests/test_data_offline.py tests/test_cli.py tests/test_benchmarks_celeba.py tests/test_notebook.py tests/test_default_precision.py::test_gram_based_methods_are_found"}
  CASES=celeba:8
  SKIP="NTKMTL n=1@celeba:8,NTKMTL n=4@celeba:8,MGDA@celeba:8"  # LS and NTKMTL-SR only
  REPEATS=1
else
  TEST_SECONDS=${DEVICE_CHECK_TEST_SECONDS:-240}
  BENCH_SECONDS=${DEVICE_CHECK_BENCH_SECONDS:-180}
  TESTS=${DEVICE_CHECK_TESTS:-tests}
  CASES=celeba:32,celeba:256
  # Left out for time: the chunked strategy (lax.map), n = 4 with its 160 backward passes
  # unrolled in the step, and at batch 256 vmap (176 s of compilation on an H200) and n = 4
  # streaming (unrolled too). The sequential rows are the point: compile time flat in k.
  SKIP="chunked@celeba:32,chunked@celeba:256,n=4 unroll@celeba:32,n=4 unroll@celeba:256"
  SKIP="$SKIP,vmap@celeba:256,n=4 streaming@celeba:256"
  REPEATS=5
fi

section "device and versions"
date -u
hostname
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total \
  --format=csv,noheader
git log -1 --format='commit %h %s' 2> /dev/null
"$PY" - <<'EOF'
import importlib, sys
print("python", sys.version.split()[0])
for name in ("jax", "jaxlib", "flax", "optax", "chex", "numpy", "scipy", "pytest", "xdist",
             "torch", "tensorflow_datasets", "sklearn", "matplotlib"):
  try:
    print(f"  {name:<20}{getattr(importlib.import_module(name), '__version__', '?')}")
  except Exception as e:
    print(f"  {name:<20}missing ({type(e).__name__})")
import jax
print("jax backend", jax.default_backend(), jax.devices())
try:
  import torch
  print("torch cuda", torch.cuda.is_available(),
        torch.cuda.get_device_name() if torch.cuda.is_available() else "")
except Exception:
  pass
EOF

section "tests ($TESTS; limit $TEST_SECONDS s)"
WORKERS=()
if "$PY" -c "import xdist" 2> /dev/null; then WORKERS=(-n 4); fi
# SIGINT on time-out: pytest stops and still prints its summary of what ran.
# shellcheck disable=SC2086
timeout -s INT -k 30 "$TEST_SECONDS" "$PY" -m pytest -q -rfEs -p no:cacheprovider \
  --durations=10 "${WORKERS[@]}" $TESTS
TESTS_RC=$?

section "step_time.py, CelebA network, cases $CASES (limit $BENCH_SECONDS s)"
TORCH=()
if "$PY" -c "import torch" 2> /dev/null; then
  TORCH=(--torch-python "$PY")
else
  echo "torch is missing: no PyTorch reference rows"
fi
timeout -k 30 "$BENCH_SECONDS" "$PY" perf/step_time.py --cases "$CASES" \
  --repeats "$REPEATS" --skip "$SKIP" --max-gib 100 "${TORCH[@]}"
BENCH_RC=$?

section "summary"
echo "tests exit code $TESTS_RC (124 or 130: stopped at the time limit), benchmark exit code" \
  "$BENCH_RC; total $(( $(date +%s) - START )) s; log $LOG"
date -u
