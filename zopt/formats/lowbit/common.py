"""What the low-bit formats (fp8, int8, int8_w8a8, int4, nf4) share.

* the storage of kept tensors (BF16, or F32 where the family's rules ask for it and the source
  has it) after :mod:`zopt.policy` decided what is quantized, recorded in the manifest;
* the streaming **converter** driver: one tensor read, quantized and written at a time;
* the **loader** driver: meta-device model from the manifest's config, quantized Linear modules
  swapped in, the rest filled tensor by tensor, running the backend ``zopt.formats.load`` selected;
* :class:`LowBitLinear`, the base of every quantized Linear module.

A format module supplies a :class:`Scheme` (how one weight is stored and how a module is built).
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..._io import atomic_path
from ...checkpoint import TensorSource
from ...errors import UnsupportedFormat
from ...families import zimage
from ...policy import Policy, kept_storage
from ...progress import progress_bar
from ...safetensors_io import StreamingSafetensorsWriter
from ..artifact import read_manifest, source_provenance, verify_manifest, write_config, write_manifest
from ..common import check_no_meta, empty_model, replace_module, set_tensor

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INT8_CPU = "int-mm-cpu"  # the CPU backend every low-bit format has: INT8 codes held, integer matmul
# rows of a weight matrix quantized at once: bounds the float32 working set of the biggest
# full-size tensors (10240 x 3840) to a few tens of MB per step
ROW_CHUNK = 1024


# ---------------------------------------------------------------------------------------------
# policy


@dataclass(frozen=True)
class Decision:
    """What happens to one tensor: ``quantize`` True, or kept at ``storage`` (``BF16``/``F32``)."""

    quantize: bool
    storage: str
    reason: str


def linear_weight_names(config: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """Diffusers names of every ``nn.Linear`` weight of the model -> (out_features, in_features)."""
    import torch

    model = empty_model(config)
    return {f"{n}.weight": (m.out_features, m.in_features) for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear)}


def decide(policy: Policy, name: str, shape: tuple[int, ...], src_dtype: str) -> Decision:
    """The policy's decision for one diffusers tensor, with the storage a kept tensor gets here."""
    d = policy.decide(name, shape)
    return Decision(d.quantize, "" if d.quantize else kept_storage(d, src_dtype), d.reason)


# ---------------------------------------------------------------------------------------------
# schemes and modules


def lowbit_linear_base():
    """``torch.nn.Module`` base class of quantized Linear modules (created on first use)."""
    global _BASE
    if _BASE is not None:
        return _BASE
    import torch
    import torch.nn.functional as F

    class _LowBitLinear(torch.nn.Module):
        """A Linear whose weight is stored quantized in buffers; ``backend`` picks the kernel.

        Subclasses define ``dequantize(dtype)`` (the quantized weight as a dense ``(out, in)``
        tensor) and ``KERNELS`` (backend name -> function(module, x2d) -> y2d). A low-rank branch
        (``lowrank_up`` ``(out, r)``, ``lowrank_down`` ``(r, in)``, see :mod:`.lowrank`) is added
        after any kernel, then the bias, in the activation dtype.
        """

        KERNELS: dict[str, Callable] = {}

        def __init__(self, in_features: int, out_features: int, backend: str):
            super().__init__()
            self.in_features, self.out_features = in_features, out_features
            if backend not in self.KERNELS:
                raise UnsupportedFormat(f"{type(self).__name__} has no kernel {backend!r}")
            self.backend = backend
            self.register_parameter("bias", None)
            self.register_buffer("lowrank_up", None)
            self.register_buffer("lowrank_down", None)

        def forward(self, x):
            shape = x.shape
            x2 = x.reshape(-1, shape[-1])
            y = self.KERNELS[self.backend](self, x2)
            if self.lowrank_up is not None:
                y = y + F.linear(F.linear(x2, self.lowrank_down.to(x2.dtype)), self.lowrank_up.to(x2.dtype)).to(y.dtype)
            if self.bias is not None:
                y = y + self.bias.to(y.dtype)
            return y.reshape(*shape[:-1], self.out_features)

        def dense(self, dtype=None):
            """The weight the layer computes with: dequantized, plus the low-rank branch if any."""
            w = self.dequantize(torch.float32)
            if self.lowrank_up is not None:
                w = w + self.lowrank_up.float() @ self.lowrank_down.float()
            return w.to(dtype or torch.float32)

        def extra_repr(self) -> str:
            rank = "" if self.lowrank_up is None else f", rank={self.lowrank_up.shape[1]}"
            return f"in_features={self.in_features}, out_features={self.out_features}, backend={self.backend}{rank}"

    _BASE = _LowBitLinear
    return _BASE


_BASE = None


class Scheme(ABC):
    """How one format stores one Linear weight.

    ``parts(name, shape)`` lists the stored tensors ``(stored_name, st_dtype, shape)`` of the
    quantized weight ``name``; ``quantize(w)`` returns them (same order) from a float32 weight;
    ``module(parts, shape, backend)`` builds the Linear module from them.
    """

    format: str = ""
    storage: str = ""  # what the manifest records for quantized tensors, e.g. "F8_E4M3"
    requires: tuple[str, ...] = ()  # manifest ``requires``: what a reader must understand (artifact.py)
    dequant_backend: str = "torch-dequant"  # the module kernel that dequantizes (any device)

    def describe(self) -> dict[str, Any]:
        """How quantized tensors are stored, in words (the manifest's ``scheme``)."""
        return {}

    def unsupported(self, shape: tuple[int, ...]) -> str | None:
        return None

    @abstractmethod
    def parts(self, name: str, shape: tuple[int, int]) -> list[tuple[str, str, tuple[int, ...]]]:
        """Stored tensors of quantized weight ``name``: (stored name, safetensors dtype, shape)."""

    @abstractmethod
    def quantize(self, w) -> list:
        """Float32 ``(out, in)`` weight -> the stored tensors, in ``parts`` order."""

    @abstractmethod
    def module(self, parts: dict[str, Any], shape: tuple[int, int], backend: str):
        """Stored tensors (by stored name) -> a Linear module running kernel ``backend``."""

    def quantize_named(self, name: str, w) -> list:
        """:meth:`quantize` for the weight called ``name`` (schemes with per-tensor data override it)."""
        return self.quantize(w)

    def extra_config(self) -> dict[str, Any]:
        """Keys added to the artifact's config.json (e.g. diffusers' ``quantization_config``)."""
        return {}

    def draft(self) -> Scheme:
        """A cheaper scheme of the same storage, for intermediate quantizations (low-rank refinement)."""
        return self

    def module_int8(self, parts: dict[str, Any], shape: tuple[int, int]):
        """The Linear module of backend ``int-mm-cpu`` (formats that have it: :func:`.int8.as_int8`)."""
        raise UnsupportedFormat(f"format {self.format!r} has no {INT8_CPU} kernel")


def quantize_rows(fn: Callable, w, *args) -> list:
    """Apply a row-wise quantizer to ``w`` in chunks of ROW_CHUNK rows; concatenate each output."""
    import torch

    if w.shape[0] <= ROW_CHUNK:
        return list(fn(w, *args))
    outs = [fn(w[i : i + ROW_CHUNK], *args) for i in range(0, w.shape[0], ROW_CHUNK)]
    return [torch.cat(col, 0) for col in zip(*outs, strict=True)]


# ---------------------------------------------------------------------------------------------
# convert


def plan(src: TensorSource, scheme: Scheme, options: Any):
    """(diffusers view, config, {name: Decision}) for ``src`` under ``scheme`` and typed ``options``."""
    d = zimage.as_diffusers(src)
    config = zimage.check_shapes(src)
    policy = Policy.from_options(options, scheme.unsupported)
    decisions = {n: decide(policy, n, d.info(n).shape, d.info(n).dtype) for n in d.names()}
    return d, config, decisions


def recorded_options(options_class, manifest: dict[str, Any]):
    """The typed options a manifest records (entries an older zopt wrote in words are ignored)."""
    return options_class.from_dict(manifest.get("options") or {}, format=manifest["format"], strict=False)


def tensor_record(name: str, dec: Decision, shape, parts=None, storage: str = "") -> dict[str, Any]:
    rec: dict[str, Any] = {"storage": storage if dec.quantize else dec.storage, "shape": list(shape),
                           "reason": dec.reason}
    if parts:
        rec["parts"] = parts
    return rec


def convert_lowbit(src: TensorSource, out: Path, scheme: Scheme, subtype: str | None, options: Any,
                   progress: bool) -> Path:
    """Stream ``src`` into a diffusers-layout artifact folder for ``scheme`` (atomically); ``options``
    (the format's typed options, resolved) are recorded in the manifest."""
    import torch

    d, config, decisions = plan(src, scheme, options)
    names = d.names()
    entries, records, layout = [], {}, {}
    for n in names:
        info, dec = d.info(n), decisions[n]
        if dec.quantize:
            parts = layout[n] = scheme.parts(n, info.shape)
            entries += parts
            records[n] = tensor_record(n, dec, info.shape, [p[0] for p in parts], scheme.storage)
        else:
            entries.append((n, dec.storage, info.shape))
            records[n] = tensor_record(n, dec, info.shape)
    total = sum(d.info(n).nbytes for n in names)
    with atomic_path(out, is_dir=True) as tmp:
        write_config(tmp, {**config, **scheme.extra_config()}, zopt_only=scheme.format)
        meta = {"format": "pt", "zopt_format": scheme.format}
        with StreamingSafetensorsWriter(tmp / WEIGHTS_NAME, entries, meta) as w, progress_bar(
            total, f"convert -> {scheme.format}", unit="B", enabled=progress
        ) as bar:
            for n in names:
                t, dec = d.get(n), decisions[n]
                if dec.quantize:
                    for (pname, _, _), q in zip(layout[n], scheme.quantize_named(n, t.float()), strict=True):
                        w.write(pname, q)
                else:
                    w.write(n, t.to(torch.float32 if dec.storage == "F32" else torch.bfloat16))
                bar.advance(d.info(n).nbytes)
                del t
        write_manifest(tmp, format=scheme.format, subtype=subtype, options=options.recorded(),
                       source=source_provenance(src, options.hash_source), config=config,
                       tensors=records, extra={"layout": "diffusers", "scheme": scheme.describe(),
                                               "summary": summarize(records),
                                               **({"requires": list(scheme.requires)} if scheme.requires else {})})
    return out


def summarize(records: dict[str, dict[str, Any]]) -> dict[str, int]:
    """Count of tensors per storage type."""
    out: dict[str, int] = {}
    for r in records.values():
        out[r["storage"]] = out.get(r["storage"], 0) + 1
    return out


# ---------------------------------------------------------------------------------------------
# load


def artifact_folder(path: Path) -> Path:
    p = Path(path)
    return p / "transformer" if (p / "transformer").is_dir() else p


def open_weights(path: Path):
    from safetensors import safe_open

    try:
        return safe_open(os.fspath(path), framework="pt", device="cpu")
    except Exception as e:  # safetensors raises its own error types for bad headers
        from ...errors import CorruptFile

        raise CorruptFile(f"cannot read weights ({e})", path) from None


def load_lowbit(path: Path, scheme_for: Callable[[dict[str, Any]], Scheme], device: str, backend: str,
                dtype: Any = None):
    """Rebuild the model of a diffusers-layout low-bit artifact (verified against its manifest),
    its quantized Linear modules running kernel ``backend`` (selected by the caller)."""

    folder = artifact_folder(path)
    manifest = verify_manifest(folder, read_manifest(folder), reads=[folder / WEIGHTS_NAME])
    with manifest_mismatch(folder):
        scheme = scheme_for(manifest)
        model = _load_lowbit_tensors(folder, manifest, scheme, device, backend, dtype)
    check_no_meta(model, folder)
    return model


class manifest_mismatch:  # noqa: N801 (used as a context manager: ``with manifest_mismatch(folder):``)
    """Turn a manifest that disagrees with its (checksummed) weights into one CorruptFile: the
    manifest drives how tensors are rebuilt, so a bad record fails inside torch or safetensors."""

    def __init__(self, folder: Path):
        self.folder = folder

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type, exc, tb) -> None:
        from safetensors import SafetensorError

        bad = (KeyError, IndexError, TypeError, ValueError, RuntimeError, AttributeError, StopIteration,
               SafetensorError)
        if exc_type is not None and issubclass(exc_type, bad):
            from ...errors import CorruptFile

            first = (str(exc).strip().splitlines() or [exc_type.__name__])[0][:160]
            raise CorruptFile(f"manifest does not match the weights ({first})",
                              self.folder / "zopt-manifest.json") from None


def check_record_shapes(manifest: dict[str, Any], folder: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor record's shape is the one its config implies (records drive module shapes);
    returns the shapes the config implies."""
    from ...errors import CorruptFile

    want = zimage.expected_shapes(manifest["config"])
    for n, rec in manifest["tensors"].items():
        if n not in want or ("shape" in rec and tuple(rec["shape"]) != want[n]):
            raise CorruptFile(f"manifest tensor {n[:120]!r} is not a tensor of this config", folder / "zopt-manifest.json")
    return want


def check_shape(t, want: tuple[int, ...], name: str, folder: Path) -> None:
    """A tensor placed into the model as stored must have the shape the config implies."""
    if tuple(t.shape) != tuple(want):
        from ...errors import CorruptFile

        raise CorruptFile(f"tensor {name[:120]!r} has shape {list(t.shape)}, the config implies {list(want)}",
                          folder / "zopt-manifest.json")


def _load_lowbit_tensors(folder: Path, manifest: dict[str, Any], scheme: Scheme, device: str, backend: str | None,
                         dtype: Any):
    want = check_record_shapes(manifest, folder)
    name = backend
    model = empty_model(manifest["config"])
    with open_weights(folder / WEIGHTS_NAME) as f:
        for n, rec in manifest["tensors"].items():
            if "parts" in rec:
                parts = {p: f.get_tensor(p) for p in rec["parts"]}
                shape = tuple(rec["shape"])
                mod = scheme.module_int8(parts, shape) if name == INT8_CPU else scheme.module(parts, shape, name)
                mod = mod.to(device)
                replace_module(model, n.rsplit(".", 1)[0], mod)
        for n, rec in manifest["tensors"].items():
            if "parts" not in rec:
                t = f.get_tensor(n)
                check_shape(t, want[n], n, folder)
                set_tensor(model, n, t.to(device=device, dtype=dtype or t.dtype))
    model.zopt_backend = name
    return model
