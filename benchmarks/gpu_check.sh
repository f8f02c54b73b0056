#!/usr/bin/env bash
# One command that checks every CUDA path of zopt on a machine with an NVIDIA GPU and no network.
#
#     bash benchmarks/gpu_wheels.sh     # first, where PyPI is reachable: fills .whl/ (48 MiB)
#     bash benchmarks/gpu_check.sh      # on the GPU machine, from the repository root, .whl/ beside it
#
# Parts, each under its own time limit so the whole ends within 9 minutes on an H100 or H200:
#   1. install the wheels of .whl/ into a private folder (pip --no-index --no-deps --target); zopt
#      itself runs from this checkout (PYTHONPATH);
#   2. print the GPU, driver, torch, CUDA and package versions;
#   3. every gpu-marked test (pytest -m gpu);
#   4. the GPU benchmark (benchmarks/gpu_bench.py) on the medium model (dim 1536, 8 layers);
#   5. the same on the full-size model (6.15B parameters, seeded random weights made on the GPU);
#   6. the benchmark table, printed last.
# GPU_CHECK_PARTS=tests,medium,full (the default) picks parts 3-5, e.g. GPU_CHECK_PARTS=full to rerun
# one part that stopped at its limit without paying for the others again.
# Files go to $OUT when it is set (else bench-out/gpu-check/): the log, the pytest report and the
# benchmark JSON. Without CUDA the GPU parts are skipped, saying so, and the benchmark runs its CPU
# smoke on the tiny model instead. Exit status: 0 when every part that ran passed.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
OUTDIR=${OUT:-$REPO/bench-out/gpu-check}
mkdir -p "$OUTDIR"
PY=${PYTHON:-python3}
# seconds per part (override with the environment variables to rebalance)
PYTEST_S=${GPU_CHECK_PYTEST_S:-180}
MEDIUM_S=${GPU_CHECK_MEDIUM_S:-100}
FULL_S=${GPU_CHECK_FULL_S:-190}
DRY_S=${GPU_CHECK_DRY_S:-300}
PARTS=",${GPU_CHECK_PARTS:-tests,medium,full},"
want() { [[ "$PARTS" == *",$1,"* ]]; }
exec > >(tee "$OUTDIR/gpu-check.log") 2>&1
T0=$(date +%s)
FAILED=()
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1

part() { echo; echo "=== $1  (+$(( $(date +%s) - T0 )) s)"; }
# run "name seconds command..." under a hard limit; record a failure or a time-out
limited() {
    local name=$1 secs=$2
    shift 2
    timeout -k 10 "$secs" "$@"
    local rc=$?
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
        echo "*** $name: stopped at its ${secs} s limit"
        FAILED+=("$name (time limit)")
    elif [ "$rc" != 0 ]; then
        echo "*** $name: exit status $rc"
        FAILED+=("$name (exit $rc)")
    fi
}

part "1. install the brought wheels"
SITE=${TMPDIR:-/tmp}/zopt-gpu-site
if ls .whl/*.whl >/dev/null 2>&1; then
    rm -rf "$SITE"
    if $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl; then
        echo "installed into $SITE: $(cd .whl && ls *.whl | tr '\n' ' ')"
        export PYTHONPATH="$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}"
    else
        echo "*** wheel install failed"
        FAILED+=("wheel install")
        export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
    fi
else
    echo "no .whl/ folder here (run benchmarks/gpu_wheels.sh first and carry .whl): using the installed packages"
    export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
fi

part "2. versions"
if ! $PY -c "import torch" 2>/dev/null; then
    echo "*** $PY cannot import torch; set PYTHON to an interpreter with torch"
    exit 2
fi
nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv 2>/dev/null || echo "nvidia-smi: not available"
$PY - <<'EOF'
import importlib, importlib.metadata as md, platform
import torch
print(f"python {platform.python_version()}  torch {torch.__version__}  CUDA {torch.version.cuda}  "
      f"cuDNN {torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"GPU {p.name}  compute capability {p.major}.{p.minor}  {p.total_memory / 2**30:.1f} GiB")
else:
    print("no CUDA device: the GPU parts below are skipped")
for name, mod in (("diffusers", "diffusers"), ("transformers", "transformers"), ("accelerate", "accelerate"),
                  ("gguf", "gguf"), ("bitsandbytes", "bitsandbytes"), ("onnxruntime", "onnxruntime"),
                  ("safetensors", "safetensors"), ("huggingface-hub", "huggingface_hub")):
    try:
        m = importlib.import_module(mod)
        print(f"  {name:16s} {md.version(name) if name != 'onnxruntime' else m.__version__:10s} {m.__file__}")
    except Exception as e:
        print(f"  {name:16s} MISSING ({type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''})")
try:
    import onnxruntime
    print("  onnxruntime providers:", ", ".join(onnxruntime.get_available_providers()))
except Exception:
    pass
from zopt.platform.hardware import detect
hw = detect()
print(f"zopt sees: {hw.fingerprint()}  fp8 matmul {hw.fp8_matmul}  int8 matmul {hw.int8_matmul}  "
      f"packages {sorted(hw.packages)}")
EOF

CUDA=$($PY -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)

part "3. gpu-marked tests (pytest -m gpu)"
if ! want tests; then
    echo "not in GPU_CHECK_PARTS: skipped"
elif [ "$CUDA" = 1 ]; then
    limited "pytest -m gpu" "$PYTEST_S" $PY -m pytest -m gpu -q -n 4 -p no:cacheprovider \
        --junitxml="$OUTDIR/pytest-gpu.xml" tests
else
    echo "no CUDA device: every gpu-marked test skips; collecting them to show which:"
    limited "pytest -m gpu (collect)" "$PYTEST_S" $PY -m pytest -m gpu -q -p no:cacheprovider \
        --junitxml="$OUTDIR/pytest-gpu.xml" tests
fi

JSONS=()
if [ "$CUDA" = 1 ]; then
    part "4. GPU benchmark, medium model"
    if want medium; then
        limited "bench medium" "$MEDIUM_S" $PY benchmarks/gpu_bench.py --size medium --budget $((MEDIUM_S - 35)) \
            --json "$OUTDIR/gpu-bench-medium.json"
        JSONS+=("$OUTDIR/gpu-bench-medium.json")
    else
        echo "not in GPU_CHECK_PARTS: skipped"
    fi
    part "5. GPU benchmark, full-size model"
    if want full; then
        limited "bench full" "$FULL_S" $PY benchmarks/gpu_bench.py --size full --budget $((FULL_S - 60)) \
            --json "$OUTDIR/gpu-bench-full.json"
        JSONS+=("$OUTDIR/gpu-bench-full.json")
    else
        echo "not in GPU_CHECK_PARTS: skipped"
    fi
else
    part "4-5. GPU benchmark"
    echo "no CUDA device: the medium and full-size GPU benchmarks are skipped."
    echo "running the benchmark's CPU smoke instead (tiny model, same code, wall-clock timing, no VRAM):"
    limited "bench dry" "$DRY_S" $PY benchmarks/gpu_bench.py --dry --json "$OUTDIR/gpu-bench-dry.json"
    JSONS+=("$OUTDIR/gpu-bench-dry.json")
fi

part "6. results"
EXISTING=()
for j in "${JSONS[@]}"; do [ -s "$j" ] && EXISTING+=("$j"); done  # a part killed before its first case wrote none
if [ "${#EXISTING[@]}" -gt 0 ]; then
    $PY benchmarks/gpu_bench.py --table "${EXISTING[@]}" | tee "$OUTDIR/gpu-bench.md"
else
    echo "no benchmark report to print"
fi
echo
echo "files: $OUTDIR"
if [ "${#FAILED[@]}" = 0 ]; then
    echo "gpu_check: every part passed in $(( $(date +%s) - T0 )) s$([ "$CUDA" = 1 ] || echo ' (GPU parts skipped: no CUDA device)')"
    exit 0
fi
echo "gpu_check: FAILED: ${FAILED[*]} ($(( $(date +%s) - T0 )) s)"
exit 1
