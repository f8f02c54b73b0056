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

_BNB = {"bitsandbytes": "0.45.5"}
_DESK = _X86 + ("avx_vnni",)


def _geforce(name: str, cc: tuple[int, int], total_gib: float, free_gib: float, system_gib: int, cores: int = 8,
             packages: dict[str, str] | None = None, flags: tuple[str, ...] = _X86) -> Hardware:
    """A consumer NVIDIA card driving the desktop (free < total: the display holds some memory)."""
    return Hardware("cuda", f"NVIDIA GeForce {name}", cc, f"sm_{cc[0]}{cc[1]}", int(total_gib * GB),
                    int(free_gib * GB), bf16=cc >= (8, 0), fp16=True, fp8_matmul=cc >= (8, 9),
                    int8_matmul=cc >= (7, 5), cpu_flags=flags, cores=cores, packages=dict(packages or _BNB),
                    ort_providers=_ORT_NV, system_memory=system_gib * GB, system_free=int(system_gib * 0.7 * GB),
                    torch_version="2.7.0")


def _cpu(name: str, ram_gib: int, free_gib: float, cores: int, flags: tuple[str, ...]) -> Hardware:
    return Hardware("cpu", name, None, "x86_64", ram_gib * GB, int(free_gib * GB), bf16=True, fp16=True,
                    fp8_matmul=False, int8_matmul=True, cpu_flags=flags, cores=cores,
                    packages={"onnxruntime": "1.22.0"}, ort_providers=_ORT_CPU, system_memory=ram_gib * GB,
                    system_free=int(free_gib * GB), torch_version="2.7.0")


# The machines people run Z-Image on: the planner's profiles (the table in docs/runtime.md). The
# registry matrix and the backend tests use :data:`FAKES`; every simulated name works with ``fake()``.
PROFILES: dict[str, Hardware] = {**FAKES, **{
    "rtx4090-24gb": _geforce("RTX 4090", (8, 9), 24, 23.0, 64, 16, flags=_DESK),
    "rtx4080-16gb": _geforce("RTX 4080", (8, 9), 16, 15.2, 32, 8, flags=_DESK),
    "rtx4060ti-16gb": _geforce("RTX 4060 Ti", (8, 9), 16, 15.2, 32, 8, flags=_DESK),
    "rtx3060-12gb": _geforce("RTX 3060", (8, 6), 12, 11.3, 32, 8),
    "rtx3070-8gb": _geforce("RTX 3070", (8, 6), 8, 7.3, 32, 8),
    "rtx3050-6gb": _geforce("RTX 3050", (8, 6), 6, 5.4, 16, 6),
    "rtx2060-6gb": _geforce("RTX 2060", (7, 5), 6, 5.4, 16, 6, packages={}),
    "rtx3050-laptop-4gb": _geforce("RTX 3050 Laptop GPU", (8, 6), 4, 3.6, 16, 8),
    # Turing datacenter card: no bf16, no display; 15 GiB usable of its 16 GB.
    "t4-16gb": Hardware("cuda", "Tesla T4", (7, 5), "sm_75", 15 * GB, int(14.6 * GB), bf16=False, fp16=True,
                        fp8_matmul=False, int8_matmul=True, cpu_flags=_X86 + ("avx512f",), cores=8,
                        packages=dict(_BNB), ort_providers=_ORT_NV, system_memory=52 * GB, system_free=48 * GB,
                        torch_version="2.7.0"),
    # RDNA3 under ROCm: no FP8 matmul, no flash-attn wheels.
    "rocm-7900xtx": Hardware("rocm", "AMD Radeon RX 7900 XTX", None, "gfx1100", 24 * GB, int(23.2 * GB),
                             bf16=True, fp16=True, fp8_matmul=False, int8_matmul=True, cpu_flags=_DESK, cores=16,
                             packages={"onnxruntime": "1.22.0"},
                             ort_providers=("MIGraphXExecutionProvider", "CPUExecutionProvider"),
                             system_memory=64 * GB, system_free=48 * GB, torch_version="2.7.0"),
    "apple-m2-16gb": Hardware("mps", "Apple M2", None, "arm64", 16 * GB, int(10.5 * GB), bf16=True, fp16=True,
                              cpu_flags=("neon", "asimd"), cores=8, packages={"onnxruntime": "1.22.0"},
                              ort_providers=("CoreMLExecutionProvider", "CPUExecutionProvider"),
                              system_memory=16 * GB, system_free=int(10.5 * GB), torch_version="2.7.0"),
    "cpu-16gb": _cpu("Intel Core i7-1260P", 16, 10.5, 12, _X86 + ("avx_vnni",)),
    "cpu-32gb": _cpu("AMD Ryzen 7 5800X", 32, 24.0, 8, _X86),
}}


def fake(name: str) -> Hardware:
    """The simulated record ``name`` (one of :data:`PROFILES`); raises ZoptError listing the names."""
    from ..errors import ZoptError

    try:
        return PROFILES[name]
    except KeyError:
        raise ZoptError(f"unknown simulated hardware {name!r}; choose one of {', '.join(PROFILES)}") from None
