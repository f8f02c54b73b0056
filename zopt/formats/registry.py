"""The format registry: one :class:`Format` entry per format, everything the rest of zopt needs to
know about it as data. A format's code lives in its own module (see ``docs/formats.md``).

An entry names the module (imported only when the format is used, so ``import zopt`` stays
fast) and declares: a summary and nominal bits per weight, the artifact kind, the options class
(a :class:`~zopt.formats.options.Options` subclass in the module), the backends that can run it
(:class:`~zopt.platform.backends.Backend` data; :func:`select_backend` picks one), the planner's
candidates, the model-card tags and the packages it needs.

A format module provides

* ``convert(src, out, subtype, options, progress, *, format) -> Path``: writes a self-describing
  artifact (atomically) from a ``TensorSource``; ``options`` is an instance of the entry's options
  class, ``format`` the entry's name (a module may serve several entries);
* ``load(path, device, backend, dtype) -> torch.nn.Module``: rebuilds a working transformer from the
  artifact alone, running kernel ``backend`` (already selected: a loader never selects again);
* optionally ``list_types() -> list[tuple[str, float, str]]`` (subtype, bits/weight, summary).
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass, field
from typing import Any

from ..errors import MissingDependency, UnsupportedFormat
from ..platform.backends import (
    Backend,
    Selection,
    needs_any,
    needs_cc,
    needs_device,
    needs_ort_provider,
    needs_package,
    needs_rocm_arch,
)
from ..platform.backends import select as _select


@dataclass(frozen=True)
class Candidate:
    """A format spec the memory planner may recommend."""

    spec: str  # format spec as for `zopt convert --to`
    bits: float  # effective bits per quantized weight, scales included
    dequant: bool  # backend dequantizes per layer (adds a transient BF16 copy of the largest matrix)
    note: str
    fallback: bool = False  # below 4 bits: recommended only when no 4-bit-or-better format fits at all
    transient: bool = True  # a dequantizing backend also holds one BF16 copy of the largest matrix
    quality: int = 0  # quality rank across all formats, best (lowest) first; the planner's order
    unpack: float = 1.0  # dequantization passes per weight: 1 a cast and a scale, 3 K-quant/NF4/INT4 unpacking


@dataclass(frozen=True)
class Format:
    name: str
    module: str
    summary: str
    bits: float | None  # nominal bits per weight of quantized tensors (None: depends on subtype)
    artifact: str  # "file" (a single file) or "folder"
    options: str = "Options"  # name of the options class in ``module`` (Options: only the shared ones)
    backends: tuple[Backend, ...] = ()
    candidates: tuple[Candidate, ...] = ()
    tags: tuple[str, ...] = ()  # model-card tags of a published variant
    needs: tuple[tuple[str, str], ...] = field(default=())  # (import name, pip extra) to convert/load
    default_subtype: str | None = None
    suffix: str = ""  # file name suffix of a single-file artifact (".gguf")
    runtime_lora: bool = True  # a loaded model takes run-time LoRA branches (not a compiled graph)

    def load_module(self, check_needs: bool = True):
        """The format's module; MissingDependency (unless ``check_needs`` is False: the options
        class needs no optional package) / UnsupportedFormat when it cannot be used here."""
        for pkg, extra in self.needs if check_needs else ():
            if importlib.util.find_spec(pkg) is None:
                raise MissingDependency(pkg, extra, f"the {self.name} format")
        try:
            return importlib.import_module(self.module)
        except ModuleNotFoundError as e:
            if e.name and e.name.startswith("zopt"):
                raise UnsupportedFormat(f"format {self.name!r} is not available in this zopt build") from None
            raise

    def options_class(self):
        return getattr(self.load_module(check_needs=False), self.options)

    def parse_options(self, raw: dict[str, Any] | None, *, strict: bool = True):
        """The format's typed options from ``raw``; unknown keys and bad values raise OptionError."""
        return self.options_class().from_dict(raw, format=self.name, strict=strict)

    def packages(self) -> tuple[str, ...]:
        """Importable modules this format's backends and converters need."""
        from ..platform.backends import required_packages

        return tuple(dict.fromkeys(required_packages(self.backends) + tuple(p for p, _ in self.needs)))


_TORCH = Backend("torch", 10, (), "eager PyTorch on any device")


def _int8_cpu(held: str) -> Backend:
    """The CPU backend of a low-bit format: INT8 codes and ``torch._int_mm`` (benchmarks/cpu_latency.py:
    the only CPU kernel measured faster than the BF16 model; no CPU has FP8 or INT4 arithmetic)."""
    return Backend("int-mm-cpu", 20, (needs_device("cpu"),),
                   f"{held}, dynamic per-token INT8 activations, torch._int_mm (oneDNN) with INT32 accumulation")


_REPACKED = "weights re-quantized once at load to per-row INT8 codes"
_ORT = needs_package("onnxruntime", "onnx")

FORMATS: dict[str, Format] = {f.name: f for f in (
    Format("bf16", "zopt.formats.plain", "diffusers folder, bfloat16 (the reference)", 16, "folder", "PlainOptions",
           (_TORCH,), (Candidate("bf16", 16.0, False, "reference", quality=0, unpack=0.0),)),
    Format("fp16", "zopt.formats.plain", "diffusers folder, float16", 16, "folder", "PlainOptions", (_TORCH,)),
    Format("fp32", "zopt.formats.plain", "diffusers folder, float32", 32, "folder", "PlainOptions", (_TORCH,)),
    Format("gguf", "zopt.formats.gguf", "GGUF file (llama.cpp/ComfyUI/sd.cpp), F32 ... Q2_K and K-quant recipes",
           None, "file", "GGUFOptions", (
               Backend("int-mm-cpu", 20, (needs_device("cpu"),),
                       "INT8 weights re-quantized per row from the GGUF values, dynamic INT8 activations, "
                       "torch._int_mm (oneDNN) with INT32 accumulation"),
               Backend("torch-dequant", 10, (),
                       "keeps GGUF blocks in memory, dequantizes each Linear weight exactly on the fly in torch "
                       "(any device)")),
           (Candidate("gguf:Q8_0", 8.5, True, "32-weight blocks, fp16 scale", quality=30),
            Candidate("gguf:Q6_K", 6.5625, True, "256-weight super-blocks", quality=40, unpack=3.0),
            Candidate("gguf:Q5_K_M", 5.7, True, "Q5_K body, Q6_K on sensitive rows (mix)", quality=50, unpack=3.0),
            Candidate("gguf:Q4_K_M", 4.85, True, "Q4_K body, Q6_K on sensitive rows (mix)", quality=60, unpack=3.0),
            Candidate("gguf:Q4_K_S", 4.6, True, "Q4_K body, fewer Q5_K rows (mix)", quality=65, unpack=3.0),
            Candidate("gguf:Q3_K_M", 3.9, True, "Q3_K body (mix)", fallback=True, quality=90, unpack=3.0),
            Candidate("gguf:Q2_K", 2.625, True, "lowest quality", fallback=True, quality=100, unpack=3.0)),
           ("gguf",), default_subtype="Q8_0", suffix=".gguf"),
    Format("fp8", "zopt.formats.lowbit.fp8", "FP8 E4M3FN (or E5M2) weights, per-output-channel scales", 8, "folder",
           "FP8Options", (
               Backend("scaled-mm", 30, (needs_any(needs_cc(8, 9), needs_rocm_arch("gfx94", "gfx95")),),
                       "torch._scaled_mm FP8 matmul (dynamic per-tensor E4M3 activations; E4M3FNUZ on gfx94x)"),
               _int8_cpu(_REPACKED),
               Backend("fp8-storage", 10, (),
                       "FP8 weights in memory, dequantized per layer, matmul in bf16/fp16/fp32")),
           (Candidate("fp8", 8.0 + 32 / 3840, True, "E4M3 + one F32 scale per output row", quality=10),),
           ("fp8",)),
    Format("int8", "zopt.formats.lowbit.int8", "INT8 symmetric per-output-channel weights", 8, "folder", "Int8Options",
           (_int8_cpu("the stored INT8 codes"),
            Backend("torch-dequant", 10, (), "INT8 weights dequantized per layer, matmul in the activation dtype")),
           (Candidate("int8", 8.0 + 32 / 3840, True, "+ one F32 scale per output row", quality=20),), ("int8",)),
    Format("int8_w8a8", "zopt.formats.lowbit.int8", "INT8 weights + dynamic per-token INT8 activations", 8, "folder",
           "Int8Options", (
               Backend("int-mm-cuda", 30, (needs_device("cuda", "rocm"),),  # torch._int_mm: hipBLASLt on ROCm
                       "torch._int_mm INT8 x INT8 -> INT32 with dynamic per-token activation scales"),
               # measured on CPU (benchmarks/int_mm_cpu.py): torch._int_mm beats dequant + fp32 matmul
               Backend("int-mm-cpu", 20, (needs_device("cpu"),),
                       "torch._int_mm on CPU (oneDNN INT8 GEMM) with dynamic per-token activation scales"),
               Backend("torch-dequant", 10, (),
                       "simulated W8A8: the same per-token INT8 activations, float matmul (any device)")),
           tags=("int8",)),
    Format("int4", "zopt.formats.lowbit.int4", "INT4 group-wise asymmetric weights with clipping search", 4, "folder",
           "Int4Options",
           (_int8_cpu(_REPACKED),
            Backend("torch-dequant", 10, (), "INT4 unpacked and dequantized per layer, matmul in the activation dtype")),
           (Candidate("int4", 4.0 + 24 / 128, True, "128-weight groups, F16 scale + U8 zero", quality=80, unpack=3.0),), ("int4",)),
    Format("nf4", "zopt.formats.lowbit.nf4", "bitsandbytes 4-bit NormalFloat, blocksize 64", 4, "folder", "NF4Options",
           (Backend("bitsandbytes", 30, (needs_device("cuda", "rocm"), needs_package("bitsandbytes", "bnb")),
                    "bitsandbytes matmul_4bit (CUDA; ROCm builds of bitsandbytes >= 0.45)"),
            _int8_cpu(_REPACKED),
            Backend("torch-dequant", 10, (),
                    "zopt's NF4 dequantization per layer, matmul in the activation dtype")),
           (Candidate("nf4", 4.5, True, "64-weight blocks, fp32 absmax", quality=70, unpack=3.0),), ("nf4",)),
    Format("onnx", "zopt.formats.onnx", "ONNX export (fp32/fp16/bf16) and onnxruntime int8/int4 variants",
           None, "folder", "ONNXOptions", (
               Backend("ort-tensorrt", 30, (_ORT, needs_ort_provider("TensorrtExecutionProvider")),
                       "onnxruntime with the TensorRT execution provider (CUDA, CPU fallback per node)"),
               Backend("ort-cuda", 20, (_ORT, needs_ort_provider("CUDAExecutionProvider")),
                       "onnxruntime CUDA execution provider"),
               # AMD GPUs: onnxruntime-rocm / onnxruntime-migraphx builds
               Backend("ort-migraphx", 25, (_ORT, needs_ort_provider("MIGraphXExecutionProvider")),
                       "onnxruntime MIGraphX execution provider (AMD GPU, ROCm provider and CPU fallback)"),
               Backend("ort-rocm", 15, (_ORT, needs_ort_provider("ROCMExecutionProvider")),
                       "onnxruntime ROCm execution provider (AMD GPU)"),
               Backend("ort-cpu", 10, (_ORT, needs_ort_provider("CPUExecutionProvider")),
                       "onnxruntime CPU execution provider")),
           tags=("onnx",), needs=(("onnx", "onnx"), ("onnxruntime", "onnx")), default_subtype="fp32",
           runtime_lora=False),
    Format("tensorrt", "zopt.formats.onnx.tensorrt", "TensorRT engine built from the ONNX export (NVIDIA GPU)",
           None, "folder", "TensorRTOptions",
           (Backend("tensorrt", 10, (needs_device("cuda"), needs_package("tensorrt", "tensorrt")),
                    "TensorRT engine (execute_async_v3 on torch's CUDA stream)"),),
           tags=("tensorrt",), needs=(("tensorrt", "tensorrt"),), default_subtype="bf16",
           runtime_lora=False),
)}

# what artifact_format() reports for sources loaded as they are: they run like a plain folder
ALIASES = {"tiny": "bf16", "safetensors": "bf16"}

_STATUS: dict[str, str | None] = {}


def entry(name: str) -> Format:
    """The registry entry of format ``name`` (aliases such as ``tiny`` resolve to ``bf16``)."""
    name = ALIASES.get(name, name)
    try:
        return FORMATS[name]
    except KeyError:
        raise UnsupportedFormat(f"unknown format {name!r}; known: {', '.join(FORMATS)}") from None


def status(name: str) -> str | None:
    """None when format ``name``'s module imports here, else why not (e.g. "not in this build")."""
    f = entry(name)
    if f.name not in _STATUS:
        _STATUS[f.name] = _import_problem(f.module)
    return _STATUS[f.name]


def _import_problem(module: str) -> str | None:
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and (e.name == module or module.startswith(e.name + ".")):
            return "not in this build"
        return f"its module needs {e.name}, which is not installed"
    except ImportError as e:  # a broken install must not take doctor down with it
        return f"its module failed to import ({e})"
    return None


def select_backend(name: str | Format, hardware: Any = None,
                   prefer: str | Backend | Selection | None = None) -> Selection:
    """The backend format ``name`` runs with on ``hardware`` (or ``prefer``), and why.

    Raises UnsupportedFormat when the format's module is not in this build or nothing can run.
    """
    f = name if isinstance(name, Format) else entry(name)
    problem = status(f.name)
    if problem == "not in this build":
        raise UnsupportedFormat(f"format {f.name!r} is not in this zopt build")
    if problem is not None:
        raise UnsupportedFormat(f"format {f.name!r} cannot run: {problem}")
    return _select(f, hardware, prefer)


def packages() -> tuple[str, ...]:
    """Every importable module some format's backends or converters need (for hardware detection)."""
    return tuple(dict.fromkeys(p for f in FORMATS.values() for p in f.packages()))


def planner_candidates() -> tuple[Candidate, ...]:
    """Every format's planner candidates in quality order, best first."""
    return tuple(sorted((c for f in FORMATS.values() for c in f.candidates), key=lambda c: c.quality))


def card_tags(name: str) -> tuple[str, ...]:
    """Model-card tags of a variant in format ``name`` (none for an unknown name)."""
    f = FORMATS.get(ALIASES.get(name, name))
    return f.tags if f else ()


def option_names(name: str) -> tuple[str, ...]:
    """The option keys format ``name`` accepts."""
    return entry(name).options_class().names()
