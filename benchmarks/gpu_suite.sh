#!/usr/bin/env bash
# The one-call GPU suite (documented in benchmarks/README.md):
#
#   bash benchmarks/gpu_suite.sh [--root DIR | --out DIR] [--steps A,B,...] [--continue] [--archive FILE]
#                                [--cpu-smoke]
#
# On a CUDA machine that has this checkout, its own torch + triton and no network: installs the wheels
# carried in .whl/ (DeepSpeed and what it needs; benchmarks/fetch_wheels.sh makes that folder) into
# $FASTVL_SUITE_SITE, and fastvl from the checkout (--no-index --no-deps) first without its C++/CUDA
# extension, so that the first results come within minutes; step build-ext builds fastvl._C later (its
# CUDA kernel where nvcc is found; info.txt says whether it did). Then runs the steps below in order,
# most important first -- the compiled-kernel tests, the compile report as this GPU's JIT built it,
# co-attention and attention at ViLBERT shapes against SDPA, one ViLBERT-base training step -- each
# under its own time cap and all within one budget (FASTVL_SUITE_BUDGET_S, default 480 s = 8 minutes,
# counted from the start, install included); a step that would get less than half its cap is recorded
# as skipped, and a second call with --continue runs the rest. Everything
# lands in DIR/<date>-<device>/ (DIR: --root, default benchmarks/results; or exactly --out DIR): a log
# per step, install.log, info.txt and steps.tsv (step, exit code or "skipped", seconds).
#   --continue    run only the steps that steps.tsv of that folder does not record as run (a second call
#                 after the first ran out of budget: bring the folder back into the checkout first)
#   --steps A,B   run only these steps
#   --archive F   pack the result folder into the tar.gz F at the end (one file to fetch)
#   --cpu-smoke   the same plumbing at tiny sizes on a CPU-only machine (no install)
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

BUDGET=${FASTVL_SUITE_BUDGET_S:-480}
SITE=${FASTVL_SUITE_SITE:-/tmp/fastvl-site}
ROOT=benchmarks/results
OUT=""
SMOKE=0
CONTINUE=0
ONLY=""
ARCHIVE=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --root) ROOT=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --steps) ONLY=",$2,"; shift 2 ;;
    --continue) CONTINUE=1; shift ;;
    --archive) ARCHIVE=$2; shift 2 ;;
    --cpu-smoke) SMOKE=1; shift ;;
    *) echo "usage: bash benchmarks/gpu_suite.sh [--root DIR | --out DIR] [--steps A,B] [--continue]" \
            "[--archive FILE] [--cpu-smoke]" >&2; exit 2 ;;
  esac
done
export PYTHONUNBUFFERED=1

# The Python that holds torch: $PYTHON, else python3 (the device machine's), else python.
if [[ -z ${PYTHON:-} ]]; then
  for candidate in python3 python; do
    if command -v "$candidate" >/dev/null && "$candidate" -c "import torch" 2>/dev/null; then
      PYTHON=$candidate
      break
    fi
  done
fi
if [[ -z ${PYTHON:-} ]]; then
  echo "gpu_suite: no python here imports torch (set PYTHON)" >&2
  exit 2
fi
if ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  if [[ $SMOKE == 0 ]]; then
    echo "gpu_suite: no CUDA device here (use --cpu-smoke to check the suite's plumbing on a CPU)" >&2
    exit 2
  fi
fi

INSTALL_LOG=$(mktemp)
INSTALL_RC=0
if [[ $SMOKE == 0 ]]; then
  # 1. Wheels that travelled with the checkout (nothing can be downloaded there): into their own folder,
  #    first on the path of this script and of every process it starts.
  if compgen -G ".whl/*.whl" >/dev/null; then
    echo "gpu_suite: installing $(ls .whl/*.whl | wc -l) carried wheels from .whl/ into $SITE"
    if "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        .whl/*.whl >>"$INSTALL_LOG" 2>&1; then
      export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    else
      INSTALL_RC=1
      echo "gpu_suite: installing .whl/ failed (install.log); DeepSpeed runs will be skipped"
    fi
  else
    echo "gpu_suite: no .whl/ folder: DeepSpeed runs will be skipped unless it is installed (benchmarks/README.md)"
  fi
  # 2. fastvl from the checkout without the extension (seconds), unless it is installed already; step
  #    build-ext builds fastvl._C later, after the first results.
  if "$PYTHON" -c "import importlib.metadata; importlib.metadata.version('fastvl'); import fastvl.kernels" \
      >>"$INSTALL_LOG" 2>&1; then
    echo "gpu_suite: fastvl already installed"
  else
    echo "gpu_suite: installing fastvl without fastvl._C (FASTVL_BUILD_EXT=0; step build-ext builds it)"
    FASTVL_BUILD_EXT=0 timeout 120 "$PYTHON" -m pip install --no-build-isolation --no-index --no-deps -e . \
      >>"$INSTALL_LOG" 2>&1
    INSTALL_RC=$?
  fi
else
  echo "cpu smoke run: using the installed fastvl and packages" >"$INSTALL_LOG"
fi
if ! "$PYTHON" -c "import fastvl.bench.harness" 2>>"$INSTALL_LOG"; then
  cat "$INSTALL_LOG" >&2
  echo "gpu_suite: fastvl does not import after the install (log above)" >&2
  exit 1
fi

if [[ -z $OUT ]]; then
  OUT=$("$PYTHON" -c "from fastvl.bench import harness; print(harness.results_dir(harness.default_device(), '$ROOT'))")
  if [[ $CONTINUE == 1 && ! -d $OUT ]]; then  # a first call of another day: its newest folder for this device
    DEVICE_SLUG=$(basename "$OUT" | cut -c12-)
    NEWEST=$(ls -d "$ROOT"/*-"$DEVICE_SLUG" 2>/dev/null | sort | tail -n 1)
    [[ -n $NEWEST ]] && OUT=$NEWEST
  fi
fi
mkdir -p "$OUT"
mv "$INSTALL_LOG" "$OUT/install.log"
[[ -f $OUT/steps.tsv ]] || printf "step\texit\tseconds\n" >"$OUT/steps.tsv"
printf "install\t%s\t%s\n" "$INSTALL_RC" "$SECONDS" >>"$OUT/steps.tsv"
if [[ -n $ARCHIVE ]]; then  # also when a later command fails or the script is stopped
  trap 'tar -czf "$ARCHIVE" -C "$(dirname "$OUT")" "$(basename "$OUT")" &&
        echo "gpu_suite: packed $OUT into $ARCHIVE"' EXIT
fi

"$PYTHON" -m fastvl info >"$OUT/info.txt" 2>&1
# What the run can and cannot use here (nothing can be fetched on the device machine).
"$PYTHON" - >>"$OUT/info.txt" 2>&1 <<'PY'
import importlib.util, os, platform, shutil, subprocess
import torch
from torch.utils.cpp_extension import CUDA_HOME  # where the extension build looks for nvcc
from fastvl import _ext
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda})")
nvcc = shutil.which("nvcc") or (os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else None)
version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip() if nvcc else ""
print(f"nvcc: {version.splitlines()[-1] if version else 'not found'}")
info = _ext.build_info()
print(f"fastvl._C: {'built' if info['built'] else 'NOT built'}, CUDA kernels: {'yes' if info['cuda'] else 'no'}, "
      f"ops: {', '.join(info['ops']) or '-'}")
wanted = ("pytest", "xdist", "pytest_timeout", "matplotlib", "tqdm", "numpy", "triton", "deepspeed", "pydantic",
          "hjson", "tokenizers", "safetensors")
missing = [m for m in wanted if importlib.util.find_spec(m) is None]
print("python packages missing here:", ", ".join(missing) or "none")
if "deepspeed" not in missing:
    try:
        import deepspeed
        print(f"deepspeed {deepspeed.__version__} imports")
    except Exception as error:  # noqa: BLE001 - reported: the training tests will fail or skip
        print(f"deepspeed does NOT import: {type(error).__name__}: {error}")
PY
grep -E "^(fastvl._C|nvcc|python packages missing|deepspeed)" "$OUT/info.txt"
echo "gpu_suite: writing to $OUT (budget ${BUDGET}s, ${SECONDS}s used)"

# pytest-xdist spreads the GPU tests over several processes (Triton compiles on the CPU): where installed.
XDIST=()
if [[ $SMOKE == 0 ]] && "$PYTHON" -c "import xdist" 2>/dev/null; then
  XDIST=(-n "${FASTVL_SUITE_TEST_WORKERS:-8}")
fi

# set_step NAME: CAP (seconds) and CMD (the command) of step NAME
set_step() {
  local name=$1
  if [[ $SMOKE == 0 ]]; then
    case "$name" in
      kernel-tests) CAP=150; CMD=("$PYTHON" -m pytest -q -m gpu "${KERNEL_TESTS[@]}" -p no:cacheprovider
                                  ${XDIST[@]+"${XDIST[@]}"} --durations=15 --junitxml="$OUT/kernel-tests.xml") ;;
      jit-report) CAP=60; CMD=("$PYTHON" -m fastvl.aot --jit --json "$OUT/compile-report-jit.json") ;;
      attention-vilbert) CAP=90; CMD=("$PYTHON" benchmarks/bench_attention.py --vilbert --quick --out "$OUT/vilbert") ;;
      step-vilbert) CAP=90; CMD=("$PYTHON" -m fastvl bench model --model vilbert-base --batch 64 --no-max-batch
                                 --out "$OUT/vilbert") ;;
      dropout-mask) CAP=40; CMD=("$PYTHON" benchmarks/bench_dropout_mask.py --out "$OUT") ;;
      build-ext) CAP=200; CMD=(env MAX_JOBS="${MAX_JOBS:-$(nproc)}" "$PYTHON" -m pip install --no-build-isolation
                               --no-index --no-deps -e .) ;;
      gpu-tests) CAP=210; CMD=("$PYTHON" -m pytest -q -m gpu tests/ -p no:cacheprovider ${XDIST[@]+"${XDIST[@]}"}
                               "${KERNEL_TESTS_IGNORED[@]}" --continue-on-collection-errors --durations=25
                               --junitxml="$OUT/gpu-tests.xml") ;;
      bench-ops) CAP=100; CMD=("$PYTHON" -m fastvl bench ops --builtin-only --out "$OUT") ;;
      bench-model) CAP=130; CMD=("$PYTHON" -m fastvl bench model --model vilbert-base --batch 32 64 --out "$OUT") ;;
      profile) CAP=45; CMD=("$PYTHON" -m fastvl bench profile --model vilbert-base --batch 64 --out "$OUT") ;;
      parity-bf16) CAP=60; CMD=("$PYTHON" -m fastvl parity --model vilbert-base --dtype bf16 --batch 8 --quick
                                --out "$OUT/parity-vilbert-base-bfloat16.json") ;;
      bench-attention) CAP=100; CMD=("$PYTHON" benchmarks/bench_attention.py --out "$OUT") ;;
      bench-losses) CAP=60; CMD=("$PYTHON" benchmarks/bench_losses.py --out "$OUT") ;;
      bench-vlbert) CAP=50; CMD=("$PYTHON" -m fastvl bench model --model vlbert-base --batch 64 --no-max-batch
                                 --out "$OUT") ;;
      bench-albef) CAP=50; CMD=("$PYTHON" -m fastvl bench model --model albef-base --batch 64 --no-max-batch
                                --out "$OUT") ;;
      parity-fp32) CAP=50; CMD=("$PYTHON" -m fastvl parity --model vilbert-base --dtype fp32 --batch 8 --quick
                                --out "$OUT/parity-vilbert-base-float32.json") ;;
    esac
  else
    case "$name" in
      kernel-tests) CAP=60; CMD=("$PYTHON" -m pytest -q -m gpu "${KERNEL_TESTS[@]}" -p no:cacheprovider) ;;
      jit-report) CAP=300; CMD=(env -u TRITON_INTERPRET "$PYTHON" -m fastvl.aot --ci --arch 90
                                --json "$OUT/compile-report-ci.json") ;;
      attention-vilbert) CAP=60; CMD=("$PYTHON" benchmarks/bench_attention.py --device cpu --quick --vilbert
                                      --out "$OUT/vilbert") ;;
      step-vilbert) CAP=120; CMD=("$PYTHON" -m fastvl bench model --model vilbert-tiny --quick --threads 1 --batch 2
                                  --no-max-batch --out "$OUT/vilbert") ;;
      gpu-tests) CAP=120; CMD=("$PYTHON" -m pytest -q -m gpu tests/ -p no:cacheprovider "${KERNEL_TESTS_IGNORED[@]}"
                               --continue-on-collection-errors --junitxml="$OUT/gpu-tests.xml") ;;
      bench-ops) CAP=120; CMD=("$PYTHON" -m fastvl bench ops --builtin-only --quick --threads 1
                               --only co_attention region_kl_loss --out "$OUT") ;;
      bench-model) CAP=120; CMD=("$PYTHON" -m fastvl bench model --model vilbert-tiny --quick --threads 1 --batch 2
                                 --memory-cap-gb 0.05 --max-batch-limit 8 --out "$OUT") ;;
      profile) CAP=60; CMD=("$PYTHON" -m fastvl bench profile --model vilbert-tiny --quick --threads 1 --out "$OUT") ;;
      parity-fp32) CAP=60; CMD=("$PYTHON" -m fastvl parity --model vilbert-tiny --dtype fp32 --quick --threads 1
                                --out "$OUT/parity-vilbert-tiny-float32.json") ;;
      bench-attention) CAP=60; CMD=("$PYTHON" benchmarks/bench_attention.py --device cpu --quick --out "$OUT") ;;
      bench-losses) CAP=60; CMD=("$PYTHON" benchmarks/bench_losses.py --device cpu --size tiny --quick --threads 1
                                 --out "$OUT") ;;
    esac
  fi
}

# The kernels' own GPU tests (compiled Triton kernels), run first; gpu-tests runs the rest later.
KERNEL_TESTS=(tests/test_attention.py tests/test_co_attention.py tests/test_region_kl.py tests/test_layer_norm.py
              tests/test_bias_gelu.py tests/test_linear_losses.py tests/test_itc.py)
KERNEL_TESTS_IGNORED=()
for test in "${KERNEL_TESTS[@]}"; do KERNEL_TESTS_IGNORED+=(--ignore="$test"); done

if [[ $SMOKE == 0 ]]; then  # in order of what the first GPU run must show; the last ones go first if time runs out
  STEPS=(kernel-tests jit-report attention-vilbert step-vilbert dropout-mask build-ext gpu-tests bench-ops bench-model
         profile parity-bf16 bench-attention bench-losses bench-vlbert bench-albef parity-fp32)
else
  STEPS=(kernel-tests jit-report attention-vilbert step-vilbert gpu-tests bench-ops bench-model profile parity-fp32
         bench-attention bench-losses)
fi

# steps already run in this folder (any exit code; "skipped" does not count)
DONE=","
if [[ $CONTINUE == 1 ]]; then
  DONE=",$(awk -F'\t' 'NR > 1 && $1 != "install" && $2 != "skipped" {print $1}' "$OUT/steps.tsv" | paste -sd, -),"
  echo "gpu_suite: --continue: already run here: ${DONE//,/ }"
fi

# run_step NAME: runs its command with the smaller of its cap and the budget left, logging to NAME.log
run_step() {
  local name=$1
  set_step "$name"
  local left=$((BUDGET - SECONDS))
  if ((left < 15 || 2 * left < CAP)); then
    printf "%s\tskipped\t0\n" "$name" >>"$OUT/steps.tsv"
    echo "gpu_suite: $name skipped: ${left}s of the budget left, its cap is ${CAP}s" | tee -a "$OUT/steps.log"
    return
  fi
  local limit=$((CAP < left ? CAP : left)) start=$SECONDS
  echo "gpu_suite: $name (up to ${limit}s): ${CMD[*]}"
  # SIGINT first: each step saves what it measured before it stops
  timeout --signal=INT --kill-after=20 "$limit" "${CMD[@]}" >"$OUT/$name.log" 2>&1
  local rc=$?
  printf "%s\t%s\t%s\n" "$name" "$rc" "$((SECONDS - start))" >>"$OUT/steps.tsv"
  tail -n 3 "$OUT/$name.log"
}

for name in "${STEPS[@]}"; do
  if [[ -n $ONLY && $ONLY != *",$name,"* ]] || [[ $DONE == *",$name,"* ]]; then
    continue
  fi
  run_step "$name"
done

echo "gpu_suite: done in ${SECONDS}s; results in $OUT"
column -t -s $'\t' "$OUT/steps.tsv" 2>/dev/null || cat "$OUT/steps.tsv"
