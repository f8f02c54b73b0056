"""Simulated hardware records: the machines every runtime decision is checked against.

Tests, ``zopt doctor --hardware NAME``, ``zopt plan --hardware NAME`` and the generated hardware
matrix (``docs/hardware-matrix.md``) all use these, so a rule change shows up everywhere at once.
The package sets are typical installs for each machine, not guarantees.
"""

from __future__ import annotations

from .hardware import Hardware

GB = 1024**3

_ORT_CPU = ("CPUExecutionProvider",)
_ORT_NV = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
_X86 = ("avx2", "fma", "f16c")

FAKES: dict[str, Hardware] = {
    # Ampere datacenter card: bf16, no FP8 tensor cores; flash-attn 2 and xformers wheels exist.
    "cuda-sm80-24gb": Hardware(
        "cuda", "NVIDIA A30", (8, 0), "sm_80", 24 * GB, 23 * GB, bf16=True, fp16=True, fp8_matmul=False,
        int8_matmul=True, cpu_flags=_X86 + ("avx512f", "avx512_vnni"), cores=32,
        packages={"bitsandbytes": "0.45.5", "flash_attn": "2.7.4", "xformers": "0.0.30", "onnxruntime": "1.22.0"},
        ort_providers=("CUDAExecutionProvider", "CPUExecutionProvider"),
        system_memory=128 * GB, system_free=110 * GB, torch_version="2.7.0",
    ),
    # Ada laptop/desktop card with little memory: FP8 tensor cores, SageAttention is the usual extra.
    "cuda-sm89-8gb": Hardware(
        "cuda", "NVIDIA GeForce RTX 4060", (8, 9), "sm_89", 8 * GB, int(7.3 * GB), bf16=True, fp16=True,
        fp8_matmul=True, int8_matmul=True, cpu_flags=_X86 + ("avx_vnni",), cores=16,
        packages={"bitsandbytes": "0.45.5", "sageattention": "2.1.1", "tensorrt": "10.9.0", "onnxruntime": "1.22.0"},
        ort_providers=_ORT_NV, system_memory=32 * GB, system_free=24 * GB, torch_version="2.7.0",
    ),
    # Hopper: FP8, FlashAttention-3 (flash_attn_interface), TensorRT.
    "cuda-sm90-80gb": Hardware(
        "cuda", "NVIDIA H100 80GB HBM3", (9, 0), "sm_90", 80 * GB, 79 * GB, bf16=True, fp16=True,
        fp8_matmul=True, int8_matmul=True, cpu_flags=_X86 + ("avx512f", "avx512_vnni", "avx512_bf16", "amx_tile",
                                                              "amx_bf16", "amx_int8"), cores=64,
        packages={"bitsandbytes": "0.45.5", "flash_attn": "2.7.4", "flash_attn_interface": "3.0.0b1",
                  "tensorrt": "10.9.0", "onnxruntime": "1.22.0", "xformers": "0.0.30"},
        ort_providers=_ORT_NV, system_memory=512 * GB, system_free=480 * GB, torch_version="2.7.0",
    ),
    # AMD Instinct MI300X under ROCm: torch reports it as "cuda" but it is not NVIDIA; FP8 (gfx942).
    "rocm-mi300x": Hardware(
        "rocm", "AMD Instinct MI300X", None, "gfx942", 192 * GB, 190 * GB, bf16=True, fp16=True, fp8_matmul=True,
        int8_matmul=True, cpu_flags=_X86 + ("avx512f", "avx512_vnni", "avx512_bf16"), cores=96,
        packages={"flash_attn": "2.7.4", "onnxruntime": "1.22.0"},
        ort_providers=("ROCMExecutionProvider", "MIGraphXExecutionProvider", "CPUExecutionProvider"),
        system_memory=1024 * GB, system_free=1000 * GB, torch_version="2.7.0",
    ),
    # Apple silicon: unified memory, no CUDA-only packages.
    "apple-mps": Hardware(
        "mps", "Apple M2 Max", None, "arm64", 32 * GB, 22 * GB, bf16=True, fp16=True, fp8_matmul=False,
        int8_matmul=False, cpu_flags=("neon", "asimd"), cores=12, packages={"onnxruntime": "1.22.0"},
        ort_providers=("CoreMLExecutionProvider", "CPUExecutionProvider"),
        system_memory=32 * GB, system_free=22 * GB, torch_version="2.7.0",
    ),
    # A desktop without a usable GPU.
    "cpu-only": Hardware(
        "cpu", "AMD Ryzen 9 7950X", None, "x86_64", 64 * GB, 52 * GB, bf16=True, fp16=True, fp8_matmul=False,
        int8_matmul=True, cpu_flags=_X86 + ("avx512f", "avx512_vnni", "avx512_bf16"), cores=16,
        packages={"onnxruntime": "1.22.0"}, ort_providers=_ORT_CPU,
        system_memory=64 * GB, system_free=52 * GB, torch_version="2.7.0",
    ),
}


def fake(name: str) -> Hardware:
    """The simulated record ``name`` (one of :data:`FAKES`); raises ZoptError listing the names."""
    from ..errors import ZoptError

    try:
        return FAKES[name]
    except KeyError:
        raise ZoptError(f"unknown simulated hardware {name!r}; choose one of {', '.join(FAKES)}") from None
