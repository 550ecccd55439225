#!/usr/bin/env bash
# bench/cuda_check.sh: every CUDA path of the project in one run, for a machine with a GPU.
#
#     bash bench/cuda_check.sh OUT_DIR             # python3 on PATH, device cuda
#     PY=.venv/bin/python DEVICE=cpu QUICK=1 bash bench/cuda_check.sh /tmp/cc   # a dry run here
#
# In order, each step's log in OUT_DIR/<step>.log and its last lines on stdout:
#   env      GPU, driver, torch / torchvision / scikit-learn / onnxruntime versions and
#            the onnxruntime providers that really open (export_onnx.open_session)
#   tests    the test suite (CPU) on this machine's torch, in the background meanwhile
#   small    python demo.py --small --device cuda: 01-06 with fp16 autocast training steps,
#            03's mixtures fitted and scored on the GPU, export, onnxruntime predictions
#   gmm      bench/gmm.py --device cuda: fit and scoring throughput on the GPU
#   onnx     bench/onnx_speed.py: the deployed graph, torch eager CUDA vs onnxruntime
#   demo     python demo.py --device cuda: the README's toy configuration (1800-iteration
#            warm-up) on the GPU; its table is not bit-identical to the CPU run's
# Nothing is written outside OUT_DIR and a temporary folder. QUICK=1 shrinks every step;
# BUDGET=S (default 560) ends the whole run within about S seconds (the last demo and the
# tests are stopped at that point, their logs kept).
set -u
OUT=${1:?usage: bash bench/cuda_check.sh OUT_DIR}
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
QUICK=${QUICK:-0}
BUDGET=${BUDGET:-560}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$OUT"
TMP=$(mktemp -d)
export PYTHONUNBUFFERED=1
cd "$ROOT" || exit 1

step() {  # step NAME TIMEOUT_S CMD...: run, log, print the tail and the exit status
    local name=$1 limit=$2 t0=$SECONDS rc
    shift 2
    echo "=== $name: $*"
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    tail -n "${TAIL:-20}" "$OUT/$name.log"
    echo "=== $name: exit $rc after $((SECONDS - t0)) s"
}

step env 120 "$PY" - <<EOF
import platform, subprocess, sys
import numpy, onnxruntime, sklearn, torch, torchvision
sys.path.insert(0, "$ROOT")
import export_onnx
print("python", platform.python_version(), "torch", torch.__version__, "torchvision", torchvision.__version__,
      "numpy", numpy.__version__, "scikit-learn", sklearn.__version__, "onnxruntime", onnxruntime.__version__)
print("torch.cuda.is_available", torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else "")
print("onnxruntime lists", onnxruntime.get_available_providers())
print("onnxruntime CUDA:", export_onnx._cuda_driver_missing() or "driver and provider present")
if torch.cuda.is_available():
    print(subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv"],
                         capture_output=True, text=True).stdout)
EOF

# the CPU test suite on this machine's torch, while the GPU steps run
if [ "$QUICK" = 1 ]; then TESTS=(tests/test_common.py -q); else TESTS=(-q); fi
( timeout $((BUDGET - 10)) "$PY" -m pytest -p no:cacheprovider "${TESTS[@]}" >"$OUT/tests.log" 2>&1
  echo "exit $?" >>"$OUT/tests.log" ) &
TESTS_PID=$!

TAIL=16 step small 600 "$PY" demo.py --small --device "$DEVICE" --data "$TMP/small_data" --work "$TMP/small_work"

if [ "$QUICK" = 1 ]; then GMM=(--scale 0.02); ONNX=(--backbone resnet18 --repeats 2); else GMM=(--scale 0.5); ONNX=(--repeats 5); fi
TAIL=30 step gmm 300 "$PY" bench/gmm.py --device "$DEVICE" "${GMM[@]}"
TAIL=20 step onnx 300 "$PY" bench/onnx_speed.py "${ONNX[@]}"

if [ "$QUICK" != 1 ]; then
    TAIL=22 step demo $((BUDGET - SECONDS - 10)) "$PY" demo.py --device "$DEVICE" --data "$TMP/data" --work "$TMP/work"
fi

wait "$TESTS_PID"
echo "=== tests (CPU, this machine's torch):"
tail -n 15 "$OUT/tests.log"
rm -rf "$TMP"
