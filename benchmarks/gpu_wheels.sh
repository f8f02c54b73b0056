#!/usr/bin/env bash
# Download, into the git-ignored .whl/ folder, the wheels that zopt and its GPU checks need on the
# GPU machine (x86-64, CPython 3.12, torch with CUDA 13, no network), and print their size against
# the 64 MiB that may travel there with the repository. Run it here, where PyPI is reachable:
#
#     bash benchmarks/gpu_wheels.sh            # downloads what is missing, prints the budget
#     bash benchmarks/gpu_wheels.sh --measure  # also downloads the wheels left out, to print their sizes
#
# What that machine already has (its image's package list): torch 2.11 (CUDA 13), transformers 5.x,
# tokenizers, safetensors 0.8, huggingface-hub 1.3x, accelerate 1.15, onnx, onnxruntime (CPU build),
# numpy, pillow, rich, psutil, pyyaml, tqdm, requests, filelock, regex, packaging, scikit-image,
# nvidia-ml-py, pytest, pytest-xdist. So only these travel:
#
#   diffusers     zopt's model and pipeline classes. Needs importlib_metadata, filelock,
#                 huggingface-hub>=1.32,<3 (there: 1.33), numpy, regex, requests, safetensors>=0.8
#                 (there: 0.8.0), Pillow: all there except importlib_metadata, which diffusers imports
#                 only on Python < 3.8 (utils/import_utils.py), so it is not brought.
#   gguf          the GGUF reader/writer zopt builds on. Needs numpy, pyyaml, requests, tqdm: all there.
#   bitsandbytes  the NF4 CUDA kernel (matmul_4bit). Needs torch, numpy, packaging: all there. Its
#                 wheel carries libbitsandbytes_cuda130.so for the machine's CUDA 13.
#
# Left out, and what that leaves unchecked on the GPU:
#   onnxruntime-gpu  244 MiB (onnxruntime_gpu-1.31.1-cp312 manylinux_2_28 wheel, 255,569,273 bytes,
#                    downloaded and measured 2026-11-26), four times the whole budget; and its CUDA 12
#                    build would not find CUDA 12 libraries next to torch's CUDA 13 ones. Without it
#                    onnxruntime has no CUDAExecutionProvider there: the ort-cuda backend, the onnx
#                    rows of the GPU benchmark and tests/formats/onnx/test_onnx_cuda_gpu.py are
#                    skipped (they say so), and only the CPU provider runs.
#   tensorrt         the TensorRT libraries wheel (tensorrt-cu13-libs) is over a gigabyte, far
#                    past 64 MiB: TensorRT engine builds and the ort-tensorrt / tensorrt backends
#                    stay unchecked on the GPU.
#   flash-attn, sageattention, xformers: compiled extensions that must match the exact torch and
#                    CUDA build there; not brought, so the attention test checks the kernels that
#                    are installed there (torch's own: native, _native_*, flex).
set -euo pipefail
cd "$(dirname "$0")/.."

PIP=${PIP:-python3 -m pip}
DEST=.whl
BUDGET=$((64 * 1024 * 1024))
# the versions zopt's tests run against on the development machines (keep one version of each:
# two of the same package stop the install on the GPU machine)
WHEELS=(diffusers==0.42.1 gguf==0.19.0 bitsandbytes==0.50.2)
LEFT_OUT=(onnxruntime-gpu==1.31.1)
PLATFORM=(--only-binary=:all: --python-version 3.12 --implementation cp
          --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
          --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)

mkdir -p "$DEST"
for spec in "${WHEELS[@]}"; do
    name=${spec%%==*}
    version=${spec##*==}
    file=$(ls "$DEST"/"${name//-/_}"-"$version"-*.whl 2>/dev/null | head -n 1 || true)
    if [ -z "$file" ]; then
        echo "downloading $spec"
        $PIP download -q --no-deps "${PLATFORM[@]}" -d "$DEST" "$spec" 2>&1 | grep -v "is ignored: it is neither" || true
    fi
done
# any other version of the same packages left from an earlier run would stop the install there
for f in "$DEST"/*.whl; do
    keep=0
    for spec in "${WHEELS[@]}"; do
        name=${spec%%==*}
        case "$(basename "$f")" in "${name//-/_}-${spec##*==}-"*) keep=1 ;; esac
    done
    if [ "$keep" = 0 ]; then echo "removing $(basename "$f") (not in the wheel set)"; rm -f "$f"; fi
done

size() { stat -c %s "$1"; }
mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }

echo
echo "wheels in $DEST/ (for: bash benchmarks/gpu_check.sh with carry .whl):"
total=0
count=0
for f in "$DEST"/*.whl; do
    s=$(size "$f")
    total=$((total + s))
    count=$((count + 1))
    printf "  %-64s %10s\n" "$(basename "$f")" "$(mib "$s")"
done
if [ "$count" != "${#WHEELS[@]}" ]; then
    echo "expected ${#WHEELS[@]} wheels, found $count: a download failed" >&2
    exit 1
fi
# what else travels: tracked files and untracked files git does not ignore
repo=$(git ls-files -z -c -o --exclude-standard | xargs -0 stat -c %s 2>/dev/null | awk '{ s += $1 } END { print s + 0 }')
all=$((total + repo))
echo "  wheels total                                                     $(mib "$total")"
echo "  repository (tracked + untracked, not ignored)                   $(mib "$repo")"
echo "  together                                                         $(mib "$all") of $(mib "$BUDGET")"
if [ "$all" -gt "$BUDGET" ]; then
    echo "OVER BUDGET by $(mib $((all - BUDGET)))" >&2
    exit 1
fi
echo "fits, $(mib $((BUDGET - all))) to spare"
echo
echo "left out (see the head of this script for what that leaves unchecked):"
if [ "${1:-}" = "--measure" ]; then
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    for spec in "${LEFT_OUT[@]}"; do
        $PIP download -q --no-deps "${PLATFORM[@]}" -d "$tmp" "$spec" 2>&1 | grep -v "is ignored: it is neither" || true
    done
    for f in "$tmp"/*.whl; do printf "  %-64s %10s (measured now)\n" "$(basename "$f")" "$(mib "$(size "$f")")"; done
else
    echo "  onnxruntime-gpu 1.31.1   244 MiB (measured 2026-11-26; --measure downloads it again)"
fi
echo "  tensorrt (cu13 libs)     over a gigabyte"
echo "  flash-attn, sageattention, xformers: compiled for one exact torch + CUDA build; not brought"
