"""What the low-bit formats (fp8, int8, int8_w8a8, int4, nf4) share.

* the per-tensor **policy**: which Linear weights are quantized, which are kept in BF16/F32
  (Z-Image's ``SENSITIVE`` rules, then ``--keep`` / ``--quantize`` regex overrides), as data
  recorded in the manifest;
* the streaming **converter** driver: one tensor read, quantized and written at a time;
* the **loader** driver: meta-device model from the manifest's config, quantized Linear modules
  swapped in, the rest filled tensor by tensor, the kernel chosen by the backend registry;
* :class:`LowBitLinear`, the base of every quantized Linear module.

A format module supplies a :class:`Scheme` (how one weight is stored and how a module is built).
"""

from __future__ import annotations

import dataclasses
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..._io import atomic_path
from ...checkpoint import TensorSource
from ...errors import UnsupportedFormat, ZoptError
from ...families import zimage
from ...progress import progress_bar
from ...safetensors_io import StreamingSafetensorsWriter
from ..artifact import read_manifest, source_provenance, verify_manifest, write_config, write_manifest
from ..common import check_no_meta, empty_model, replace_module, set_tensor

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
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


def _compile(patterns: Any) -> list[re.Pattern]:
    if not patterns:
        return []
    if isinstance(patterns, str):
        patterns = [patterns]
    out = []
    for p in patterns:
        try:
            out.append(re.compile(p))
        except re.error as e:
            raise ZoptError(f"bad tensor pattern {p!r}: {e}") from None
    return out


class Policy:
    """Per-tensor decisions for one conversion.

    Order (first that applies wins): tensors that are not Linear weights are kept; ``--keep``
    patterns keep; ``--quantize`` patterns quantize (overriding the sensitive rules); Z-Image's
    sensitive rules keep; a shape the format cannot store is kept; everything else is quantized.
    Patterns are regular expressions searched in the diffusers name and in the original name.
    """

    def __init__(self, linear: dict[str, tuple[int, int]], options: dict[str, Any],
                 unsupported: Callable[[tuple[int, ...]], str | None]):
        self.linear = linear
        self.keep = _compile(options.get("keep"))
        self.force = _compile(options.get("quantize"))
        self.unsupported = unsupported

    @staticmethod
    def _matches(pats: list[re.Pattern], name: str) -> re.Pattern | None:
        names = (name, zimage.to_original_name(name))
        return next((p for p in pats if any(p.search(n) for n in names)), None)

    def kept_storage(self, name: str, src_dtype: str) -> str:
        rule = zimage.sensitive_reason(name)
        # F32 survives only where the rule asks for it and the source has it
        return "F32" if rule is not None and rule.keep == "F32" and src_dtype == "F32" else "BF16"

    def decide(self, name: str, shape: tuple[int, ...], src_dtype: str) -> Decision:
        keep_as = self.kept_storage(name, src_dtype)
        if name not in self.linear:
            return Decision(False, keep_as, "not a Linear weight")
        if (p := self._matches(self.keep, name)) is not None:
            return Decision(False, keep_as, f"--keep {p.pattern}")
        forced = self._matches(self.force, name)
        rule = zimage.sensitive_reason(name)
        if forced is None and rule is not None:
            return Decision(False, keep_as, f"sensitive: {rule.reason}")
        why = self.unsupported(shape)
        if why:
            return Decision(False, keep_as, why)
        return Decision(True, "", f"--quantize {forced.pattern}" if forced is not None else "policy")


# ---------------------------------------------------------------------------------------------
# schemes and modules


def lowbit_linear_base():
    """``torch.nn.Module`` base class of quantized Linear modules (created on first use)."""
    global _BASE
    if _BASE is not None:
        return _BASE
    import torch

    class _LowBitLinear(torch.nn.Module):
        """A Linear whose weight is stored quantized in buffers; ``backend`` picks the kernel.

        Subclasses define ``dequantize(dtype)`` (the weight as a dense ``(out, in)`` tensor) and
        ``KERNELS`` (backend name -> function(module, x2d) -> y2d). The bias is added in the
        activation dtype after the kernel.
        """

        KERNELS: dict[str, Callable] = {}

        def __init__(self, in_features: int, out_features: int, backend: str):
            super().__init__()
            self.in_features, self.out_features = in_features, out_features
            if backend not in self.KERNELS:
                raise UnsupportedFormat(f"{type(self).__name__} has no kernel {backend!r}")
            self.backend = backend
            self.register_parameter("bias", None)

        def forward(self, x):
            shape = x.shape
            y = self.KERNELS[self.backend](self, x.reshape(-1, shape[-1]))
            if self.bias is not None:
                y = y + self.bias.to(y.dtype)
            return y.reshape(*shape[:-1], self.out_features)

        def extra_repr(self) -> str:
            return f"in_features={self.in_features}, out_features={self.out_features}, backend={self.backend}"

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

    def options(self) -> dict[str, Any]:
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

    def extra_config(self) -> dict[str, Any]:
        """Keys added to the artifact's config.json (e.g. diffusers' ``quantization_config``)."""
        return {}


def quantize_rows(fn: Callable, w, *args) -> list:
    """Apply a row-wise quantizer to ``w`` in chunks of ROW_CHUNK rows; concatenate each output."""
    import torch

    if w.shape[0] <= ROW_CHUNK:
        return list(fn(w, *args))
    outs = [fn(w[i : i + ROW_CHUNK], *args) for i in range(0, w.shape[0], ROW_CHUNK)]
    return [torch.cat(col, 0) for col in zip(*outs, strict=True)]


# ---------------------------------------------------------------------------------------------
# convert


def plan(src: TensorSource, scheme: Scheme, options: dict[str, Any]):
    """(diffusers view, config, {name: Decision}) for ``src`` under ``scheme`` and ``options``."""
    d = zimage.as_diffusers(src)
    config = zimage.check_shapes(src)
    policy = Policy(linear_weight_names(config), options, scheme.unsupported)
    decisions = {n: policy.decide(n, d.info(n).shape, d.info(n).dtype) for n in d.names()}
    return d, config, decisions


def tensor_record(name: str, dec: Decision, shape, parts=None, storage: str = "") -> dict[str, Any]:
    rec: dict[str, Any] = {"storage": storage if dec.quantize else dec.storage, "shape": list(shape),
                           "reason": dec.reason}
    if parts:
        rec["parts"] = parts
    return rec


def convert_lowbit(src: TensorSource, out: Path, scheme: Scheme, subtype: str | None, options: dict[str, Any],
                   progress: bool) -> Path:
    """Stream ``src`` into a diffusers-layout artifact folder for ``scheme`` (atomically)."""
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
        write_config(tmp, {**config, **scheme.extra_config()})
        meta = {"format": "pt", "zopt_format": scheme.format}
        with StreamingSafetensorsWriter(tmp / WEIGHTS_NAME, entries, meta) as w, progress_bar(
            total, f"convert -> {scheme.format}", unit="B", enabled=progress
        ) as bar:
            for n in names:
                t, dec = d.get(n), decisions[n]
                if dec.quantize:
                    for (pname, _, _), q in zip(layout[n], scheme.quantize(t.float()), strict=True):
                        w.write(pname, q)
                else:
                    w.write(n, t.to(torch.float32 if dec.storage == "F32" else torch.bfloat16))
                bar.advance(d.info(n).nbytes)
                del t
        write_manifest(tmp, format=scheme.format, subtype=subtype, options=manifest_options(scheme, options),
                       source=source_provenance(src, options.get("hash_source", True)), config=config,
                       tensors=records, extra={"layout": "diffusers", "summary": summarize(records)})
    return out


def manifest_options(scheme: Scheme, options: dict[str, Any]) -> dict[str, Any]:
    out = dict(scheme.options())
    for k in ("keep", "quantize"):
        if options.get(k):
            out[k] = [options[k]] if isinstance(options[k], str) else list(options[k])
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


def hardware_for(device: str):
    """The detected hardware, adjusted when the caller asks for another device (e.g. cpu on a GPU box)."""
    from ...platform.hardware import detect

    hw = detect()
    kind = str(device).split(":")[0]
    if kind != hw.torch_device:
        hw = dataclasses.replace(hw, device=kind, compute_capability=None, fp8_matmul=False)
    return hw


def choose_backend(fmt: str, device: str, backend: str | None) -> str:
    """``backend`` as given (the caller selected it for the device that computes, which is not
    ``device`` when weights load into RAM for offloading), else the best one for ``device``."""
    from ...platform.backends import backends_for, select

    if backend and backend != "auto":
        known = [b.name for b in backends_for(fmt)]
        if backend not in known:
            raise UnsupportedFormat(f"format {fmt!r} has no backend {backend!r}; known: {', '.join(known)}")
        return backend
    return select(fmt, hardware_for(device)).name


def open_weights(path: Path):
    from safetensors import safe_open

    try:
        return safe_open(os.fspath(path), framework="pt", device="cpu")
    except Exception as e:  # safetensors raises its own error types for bad headers
        from ...errors import CorruptFile

        raise CorruptFile(f"cannot read weights ({e})", path) from None


def load_lowbit(path: Path, scheme_for: Callable[[dict[str, Any]], Scheme], device: str = "cpu",
                backend: str | None = None, dtype: Any = None):
    """Rebuild the model of a diffusers-layout low-bit artifact (verified against its manifest)."""

    folder = artifact_folder(path)
    manifest = verify_manifest(folder, read_manifest(folder))
    scheme = scheme_for(manifest)
    name = choose_backend(manifest["format"], device, backend)
    model = empty_model(manifest["config"])
    with open_weights(folder / WEIGHTS_NAME) as f:
        for n, rec in manifest["tensors"].items():
            if "parts" in rec:
                parts = {p: f.get_tensor(p) for p in rec["parts"]}
                mod = scheme.module(parts, tuple(rec["shape"]), name).to(device)
                replace_module(model, n.rsplit(".", 1)[0], mod)
        for n, rec in manifest["tensors"].items():
            if "parts" not in rec:
                t = f.get_tensor(n)
                set_tensor(model, n, t.to(device=device, dtype=dtype or t.dtype))
    check_no_meta(model, folder)
    model.zopt_backend = name
    return model
