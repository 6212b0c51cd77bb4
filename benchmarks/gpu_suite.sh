#!/usr/bin/env bash
# The one-call GPU suite (documented in benchmarks/README.md):
#
#   bash benchmarks/gpu_suite.sh [--root DIR] [--cpu-smoke]
#
# On a CUDA machine with this repo and its own torch + triton: installs fastvl from the checkout (no
# network: --no-index --no-deps), then runs, each under its own time cap and all within one overall
# budget (FASTVL_SUITE_BUDGET_S, default 570 s): the op benchmarks at paper sizes, ViLBERT-base
# training throughput fused vs reference with the largest batch that fits, a torch.profiler profile of one
# ViLBERT-base training step, the layer-by-layer parity report, every `gpu`-marked test, then VL-BERT-base
# and ALBEF-base training throughput and the fp32 parity report while the budget lasts. Everything
# lands in DIR/<date>-<device>/ (DIR defaults to benchmarks/results), with a log per step and steps.tsv
# (step, exit code, seconds). --cpu-smoke runs the same plumbing at tiny sizes on a CPU-only machine.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON=${PYTHON:-python}
BUDGET=${FASTVL_SUITE_BUDGET_S:-570}
ROOT=benchmarks/results
SMOKE=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --root) ROOT=$2; shift 2 ;;
    --cpu-smoke) SMOKE=1; shift ;;
    *) echo "usage: bash benchmarks/gpu_suite.sh [--root DIR] [--cpu-smoke]" >&2; exit 2 ;;
  esac
done

if ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  if [[ $SMOKE == 0 ]]; then
    echo "gpu_suite: no CUDA device here (use --cpu-smoke to check the suite's plumbing on a CPU)" >&2
    exit 2
  fi
fi

INSTALL_LOG=$(mktemp)
if [[ $SMOKE == 0 ]]; then
  # The machine's torch/triton are kept; nothing is downloaded. The CUDA extension builds if nvcc is there.
  echo "gpu_suite: installing fastvl (pip install --no-build-isolation --no-index --no-deps -e .)"
  MAX_JOBS=${MAX_JOBS:-$(nproc)} timeout 200 "$PYTHON" -m pip install --no-build-isolation --no-index --no-deps \
    -e . >"$INSTALL_LOG" 2>&1
  INSTALL_RC=$?
  if [[ $INSTALL_RC != 0 ]]; then  # e.g. nvcc too slow or failing: the Triton kernels do not need the .cu part
    echo "gpu_suite: install failed (exit $INSTALL_RC); retrying without the CUDA extension (FASTVL_BUILD_CUDA=0)"
    FASTVL_BUILD_CUDA=0 timeout 120 "$PYTHON" -m pip install --no-build-isolation --no-index --no-deps -e . \
      >>"$INSTALL_LOG" 2>&1
    INSTALL_RC=$?
  fi
else
  INSTALL_RC=0
  echo "cpu smoke run: using the installed fastvl" >"$INSTALL_LOG"
fi
if ! "$PYTHON" -c "import fastvl.bench.harness" 2>>"$INSTALL_LOG"; then
  cat "$INSTALL_LOG" >&2
  echo "gpu_suite: fastvl does not import after the install (log above)" >&2
  exit 1
fi

OUT=$("$PYTHON" -c "from fastvl.bench import harness; print(harness.results_dir(harness.default_device(), '$ROOT'))")
mkdir -p "$OUT"
mv "$INSTALL_LOG" "$OUT/install.log"
printf "step\texit\tseconds\n" >"$OUT/steps.tsv"
printf "install\t%s\t%s\n" "$INSTALL_RC" "$SECONDS" >>"$OUT/steps.tsv"
"$PYTHON" -m fastvl info >"$OUT/info.txt" 2>&1
# Nothing can be fetched: say which helpers are absent (no pytest: no gpu-tests; no matplotlib: no PNGs).
"$PYTHON" - >>"$OUT/info.txt" 2>&1 <<'PY'
import importlib.util
missing = [m for m in ("pytest", "matplotlib", "tqdm", "numpy", "triton") if importlib.util.find_spec(m) is None]
print("python packages missing here:", ", ".join(missing) or "none")
PY
grep "missing here" "$OUT/info.txt"
echo "gpu_suite: writing to $OUT (budget ${BUDGET}s)"

# step NAME CAP_SECONDS COMMAND...: runs COMMAND with the smaller of CAP and the budget left, logs to NAME.log
step() {
  local name=$1 cap=$2
  shift 2
  local left=$((BUDGET - SECONDS))
  if ((left < 15)); then
    printf "%s\tskipped\t0\n" "$name" >>"$OUT/steps.tsv"
    echo "gpu_suite: $name skipped: out of time" | tee -a "$OUT/steps.log"
    return
  fi
  local limit=$((cap < left ? cap : left)) start=$SECONDS
  echo "gpu_suite: $name (up to ${limit}s)"
  timeout --signal=INT --kill-after=15 "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  printf "%s\t%s\t%s\n" "$name" "$rc" "$((SECONDS - start))" >>"$OUT/steps.tsv"
  tail -n 3 "$OUT/$name.log"
}

if [[ $SMOKE == 0 ]]; then
  step bench-ops 150 "$PYTHON" -m fastvl bench ops --out "$OUT"
  step bench-model 150 "$PYTHON" -m fastvl bench model --model vilbert-base --batch 32 64 --out "$OUT"
  step profile 60 "$PYTHON" -m fastvl bench profile --model vilbert-base --batch 64 --out "$OUT"
  step parity-bf16 90 "$PYTHON" -m fastvl parity --model vilbert-base --dtype bf16 --batch 8 --quick \
    --out "$OUT/parity-vilbert-base-bfloat16.json"
  step gpu-tests 240 "$PYTHON" -m pytest -q -m gpu tests/ -p no:cacheprovider --junitxml="$OUT/gpu-tests.xml"
  step bench-vlbert 60 "$PYTHON" -m fastvl bench model --model vlbert-base --batch 64 --no-max-batch --out "$OUT"
  step bench-albef 60 "$PYTHON" -m fastvl bench model --model albef-base --batch 64 --no-max-batch --out "$OUT"
  step parity-fp32 60 "$PYTHON" -m fastvl parity --model vilbert-base --dtype fp32 --batch 8 --quick \
    --out "$OUT/parity-vilbert-base-float32.json"
else
  step bench-ops 120 "$PYTHON" -m fastvl bench ops --quick --threads 1 --only co_attention region_kl_loss \
    --out "$OUT"
  step bench-model 120 "$PYTHON" -m fastvl bench model --model vilbert-tiny --quick --threads 1 --batch 2 \
    --memory-cap-gb 0.05 --max-batch-limit 8 --out "$OUT"
  step profile 60 "$PYTHON" -m fastvl bench profile --model vilbert-tiny --quick --threads 1 --out "$OUT"
  step parity-fp32 60 "$PYTHON" -m fastvl parity --model vilbert-tiny --dtype fp32 --quick --threads 1 \
    --out "$OUT/parity-vilbert-tiny-float32.json"
  step gpu-tests 120 "$PYTHON" -m pytest -q -m gpu tests/ -p no:cacheprovider \
    --junitxml="$OUT/gpu-tests.xml"
fi

echo "gpu_suite: done in ${SECONDS}s; results in $OUT"
column -t "$OUT/steps.tsv" 2>/dev/null || cat "$OUT/steps.tsv"
