"""What machine is this? ``detect()`` returns a plain, serializable record; tests build fakes."""

from __future__ import annotations

import os
import platform
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class Hardware:
    device: str  # "cuda" | "rocm" | "mps" | "xpu" | "cpu"
    device_name: str
    compute_capability: tuple[int, int] | None = None  # CUDA (major, minor)
    arch: str | None = None  # e.g. "gfx942" on ROCm, "x86_64" on CPU
    total_memory: int = 0  # bytes, device memory (system RAM on CPU/MPS)
    free_memory: int = 0
    bf16: bool = True
    fp16: bool = True
    fp8_matmul: bool = False
    int8_matmul: bool = False
    cpu_flags: tuple[str, ...] = ()
    # the vector ISA torch's CPU kernels dispatch to (torch.backends.cpu.get_cpu_capability():
    # DEFAULT, AVX2, AVX512, ...; ATEN_CPU_CAPABILITY can lower it); "" when unknown
    cpu_capability: str = ""
    cores: int = 1
    packages: dict[str, str] = field(default_factory=dict)  # importable optional packages -> version
    ort_providers: tuple[str, ...] = ()
    system_memory: int = 0  # bytes of system RAM (where offloaded weights live)
    system_free: int = 0
    torch_version: str = ""

    @property
    def is_gpu(self) -> bool:
        return self.device in ("cuda", "rocm", "mps", "xpu")

    @property
    def torch_device(self) -> str:
        return {"rocm": "cuda"}.get(self.device, self.device)

    def has(self, package: str) -> bool:
        return package in self.packages

    def fingerprint(self) -> str:
        """A short stable id of the hardware class (for comparing benchmark records like with like)."""
        cc = ".".join(map(str, self.compute_capability)) if self.compute_capability else ""
        return f"{self.device}:{self.device_name}:{cc or self.arch or ''}:{self.cores}"

    @property
    def has_streams(self) -> bool:
        """Asynchronous copy streams (used by group offload to overlap transfers with compute)."""
        return self.device in ("cuda", "rocm")

    @property
    def unified_memory(self) -> bool:
        """Device and host share one memory pool (Apple silicon; CPU trivially)."""
        return self.device in ("mps", "cpu")

    def vector_width(self) -> int:
        """fp32 lanes of the vector unit torch's kernels use: from ``cpu_capability`` when torch
        reported it, else from the CPU flags (simulated machines, older records)."""
        cap = self.cpu_capability.upper()
        if cap:
            return 16 if cap.startswith("AVX512") else 8 if cap.startswith("AVX2") else 4
        return 16 if "avx512f" in self.cpu_flags else 8 if "avx2" in self.cpu_flags else 4

    def isa(self) -> list[str]:
        """Readable CPU instruction-set summary: AVX2, AVX-512, VNNI, AMX, NEON..."""
        f = set(self.cpu_flags)
        out = [label for label, keys in (("AVX2", {"avx2"}), ("AVX-512", {"avx512f"}),
                                          ("VNNI", {"avx512_vnni", "avx_vnni"}), ("AVX512-BF16", {"avx512_bf16"}),
                                          ("AMX", {"amx_tile"}), ("NEON", {"neon", "asimd"}), ("SVE", {"sve"}))
               if f & keys]
        return out

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Hardware:
        """Inverse of :meth:`to_dict` (JSON turns tuples into lists; this turns them back)."""
        d = dict(d)
        if d.get("compute_capability") is not None:
            d["compute_capability"] = tuple(d["compute_capability"])
        for k in ("cpu_flags", "ort_providers"):
            d[k] = tuple(d.get(k) or ())
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})


# Optional packages the runtime itself looks for (attention kernels, general quantization
# libraries). The packages a format's backends need come from the format registry and are
# passed to :func:`detect` by the caller (``zopt.runtime.detect``): this layer knows no formats.
RUNTIME_PACKAGES = ("optimum.quanto", "torchao", "flash_attn", "flash_attn_interface", "sageattention", "xformers",
                    "kernels")


def _cpu_flags() -> tuple[str, ...]:
    # torch reports only the vector width it dispatches to (see _cpu_capability); VNNI, AMX and
    # BF16 support, shown by doctor and used for simulated profiles, come from the kernel's list
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8",
              "fma", "f16c", "neon", "asimd", "sve")
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    have = set(line.split(":", 1)[1].split())
                    return tuple(w for w in wanted if w in have)
    except OSError:
        pass
    return ("neon",) if platform.machine() in ("arm64", "aarch64") else ()


def _cpu_capability(torch) -> str:
    """The ISA torch's CPU kernels run with (``torch.backends.cpu.get_cpu_capability()``)."""
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except (AttributeError, RuntimeError):  # torch older than 2.1
        return ""


def _packages(extra: tuple[str, ...] = ()) -> dict[str, str]:
    import importlib.metadata as md
    import importlib.util

    out = {}
    for name in sorted(set(RUNTIME_PACKAGES) | set(extra)):
        try:
            if importlib.util.find_spec(name) is None:
                continue
        except (ImportError, ValueError):
            continue
        dist = {"optimum.quanto": "optimum-quanto", "flash_attn": "flash-attn", "flash_attn_interface": "flash-attn-3"}
        try:
            out[name] = md.version(dist.get(name, name))
        except md.PackageNotFoundError:
            out[name] = "?"
    return out


def _ort_providers() -> tuple[str, ...]:
    import importlib.util

    if importlib.util.find_spec("onnxruntime") is None:
        return ()
    try:
        import onnxruntime

        return tuple(onnxruntime.get_available_providers())
    except Exception:
        return ()


def detect(packages: Iterable[str] = ()) -> Hardware:
    """Detect the best device torch can use here, with memory, dtype support and optional packages
    (:data:`RUNTIME_PACKAGES` plus ``packages``, e.g. what the formats' backends need).

    Returns a :class:`Hardware` record (plain data). Device memory is the first device's; on CPU and
    MPS the "device" memory is system RAM.
    """
    import dataclasses

    import psutil
    import torch

    vm = psutil.virtual_memory()
    hw = _detect_device(torch, psutil, tuple(packages))
    return dataclasses.replace(hw, system_memory=vm.total, system_free=vm.available,
                               torch_version=torch.__version__.split("+")[0])


def for_device(hw: Hardware, device: str) -> Hardware:
    """The record decisions are made for when the caller asks for ``device`` ("auto", "cpu",
    "cuda:1"...): ``hw`` itself for its own device, its CPU side for "cpu" on a machine with an
    accelerator (system memory, no GPU execution providers). Raises ZoptError for a device this
    machine does not have."""
    import dataclasses

    from ..errors import ZoptError

    kind = str(device).split(":")[0]
    if kind in ("auto", hw.torch_device, hw.device):
        return hw
    if kind == "cpu":
        return dataclasses.replace(hw, device="cpu", device_name="CPU", compute_capability=None, arch=None,
                                   total_memory=hw.system_memory or hw.total_memory,
                                   free_memory=hw.system_free or hw.free_memory, fp8_matmul=False,
                                   ort_providers=tuple(p for p in hw.ort_providers if p in CPU_PROVIDERS))
    if hw.device == "cpu":
        raise ZoptError(f"--device {device}: no such device here (torch sees only the CPU); use --device auto or cpu")
    raise ZoptError(f"--device {device}: this machine's accelerator is {hw.device} ({hw.device_name}); "
                    f"use --device auto, cpu or {hw.torch_device}")


# onnxruntime execution providers that run on the CPU side of a machine
CPU_PROVIDERS = ("CPUExecutionProvider", "DnnlExecutionProvider", "OpenVINOExecutionProvider", "XnnpackExecutionProvider")


def _detect_device(torch, psutil, packages: tuple[str, ...] = ()) -> Hardware:

    flags, cap = _cpu_flags(), _cpu_capability(torch)
    cores = os.cpu_count() or 1
    pk, prov = _packages(packages), _ort_providers()
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        free, total = torch.cuda.mem_get_info(0)
        if getattr(torch.version, "hip", None):
            arch = getattr(props, "gcnArchName", "").split(":")[0] or None
            return Hardware("rocm", props.name, None, arch, total, free, True, True,
                            fp8_matmul=bool(arch and arch.startswith(("gfx94", "gfx95", "gfx12"))),
                            int8_matmul=True, cpu_flags=flags, cpu_capability=cap, cores=cores, packages=pk, ort_providers=prov)
        cc = (props.major, props.minor)
        return Hardware("cuda", props.name, cc, f"sm_{cc[0]}{cc[1]}", total, free,
                        bf16=cc >= (8, 0), fp16=True, fp8_matmul=cc >= (8, 9), int8_matmul=cc >= (7, 5),
                        cpu_flags=flags, cpu_capability=cap, cores=cores, packages=pk, ort_providers=prov)
    vm = psutil.virtual_memory()
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return Hardware("mps", "Apple MPS", None, platform.machine(), vm.total, vm.available, True, True,
                        cpu_flags=flags, cpu_capability=cap, cores=cores, packages=pk, ort_providers=prov)
    if hasattr(torch, "xpu") and torch.xpu.is_available():
        props = torch.xpu.get_device_properties(0)
        return Hardware("xpu", props.name, None, None, props.total_memory, props.total_memory, True, True,
                        cpu_flags=flags, cpu_capability=cap, cores=cores, packages=pk, ort_providers=prov)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return Hardware("cpu", name, None, platform.machine(), vm.total, vm.available,
                    bf16=True, fp16=True, fp8_matmul=False, int8_matmul=True,
                    cpu_flags=flags, cpu_capability=cap, cores=cores, packages=pk, ort_providers=prov)


def whole_model_dtype(params: int, device: str = "cpu"):
    """``(dtype, free bytes)`` for a model of ``params`` parameters held whole on ``device`` (for
    measurement, not inference: no offload): float32 where it takes at most half the free memory,
    bfloat16 where that takes at most 70%, else None; float32 on a device whose free memory is not
    known (MPS)."""
    import psutil
    import torch

    kind = str(device).split(":")[0]
    if kind == "cuda":
        free = torch.cuda.mem_get_info(torch.device(device))[0]
    elif kind == "cpu":
        free = psutil.virtual_memory().available
    else:
        return torch.float32, 0
    if params * 4 <= 0.5 * free:
        return torch.float32, free
    if params * 2 <= 0.7 * free:
        return torch.bfloat16, free
    return None, free
