"""ONNX artifacts: the exported graph (fp32 / fp16 / bf16) and onnxruntime-quantized variants.

An artifact is a folder: ``model.onnx`` (graph), its external data file, ``config.json`` and
``zopt-manifest.json``. Subtypes:

* ``fp32``  the export (:mod:`zopt.formats.onnx.export`), the reference for every other subtype;
* ``fp16`` / ``bf16``  the body's matmul weights in half precision; norms, softmax, RoPE,
  embedders, adaLN and the final layer stay fp32 (``zimage.SENSITIVE``). onnxruntime's CPU
  provider has no bf16 MatMul: bf16 runs on the CUDA and TensorRT providers only;
* ``int8``  ``onnxruntime.quantization.quantize_dynamic``: per-channel int8 MatMul weights,
  activations quantized per call (``DynamicQuantizeLinear`` + ``MatMulInteger``);
* ``int4``  ``MatMulNBitsQuantizer``: block-wise 4-bit weight-only ``MatMulNBits`` (block 32,
  asymmetric by default).

Both quantized subtypes touch only the MatMuls whose weight is not precision-sensitive.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..._io import atomic_path
from ...checkpoint import TensorSource
from ...errors import MissingDependency, UnsupportedFormat
from ...families import zimage
from ...policy import Policy
from ...quiet import quiet_logging
from ..artifact import read_manifest, source_provenance, verify_manifest, write_config, write_manifest
from ..options import Options
from .export import DATA_NAME, MODEL_NAME, OPSET, export

SUBTYPES = {
    "fp32": (32.0, "float32 export (the reference)"),
    "fp16": (16.0, "float16 matmul weights; norms, softmax, RoPE, embedders in fp32"),
    "bf16": (16.0, "bfloat16 matmul weights (CUDA/TensorRT providers; no CPU kernels)"),
    "int8": (8.0, "onnxruntime dynamic quantization: per-channel int8 MatMul weights"),
    "int4": (4.0, "onnxruntime MatMulNBits: block-wise 4-bit weight-only"),
}




@dataclass(frozen=True)
class ONNXOptions(Options):
    per_channel: bool = True  # int8: one weight scale per output channel (else per tensor)
    block_size: int = 32  # int4: weights per MatMulNBits block
    symmetric: bool = False  # int4: symmetric blocks (no zero point)


def list_types() -> list[tuple[str, float, str]]:
    return [(k, bits, summary) for k, (bits, summary) in SUBTYPES.items()]


def _ort():
    try:
        import onnxruntime

        return onnxruntime
    except ImportError:
        raise MissingDependency("onnxruntime", "onnx", "onnx int8/int4 variants and running ONNX artifacts") from None


def weight_of(initializer_name: str) -> str:
    """The diffusers tensor behind a graph initializer (``model.X.weight_t`` -> ``X.weight``)."""
    name = initializer_name.removeprefix("model.")
    return name[: -len("_t")] if name.endswith(".weight_t") else name


def quantizable_matmuls(model, policy: Policy | None = None) -> tuple[list[str], list[str]]:
    """(names of MatMul nodes whose constant weight ``policy`` quantizes, names of all other MatMuls).

    ``policy`` defaults to :class:`zopt.policy.Policy` without ``--keep`` / ``--quantize`` patterns.
    """
    policy = policy or Policy()
    inits = {i.name: tuple(i.dims) for i in model.graph.initializer}
    body, other = [], []
    for node in model.graph.node:
        if node.op_type != "MatMul":
            continue
        w = node.input[1]
        name = weight_of(w)
        # a MatMul weight is stored transposed (in, out); the policy speaks of the Linear's (out, in)
        ok = w in inits and len(inits[w]) == 2 and policy.decide(name, inits[w][::-1]).quantize
        (body if ok else other).append(node.name)
    return body, other


# onnxruntime's quantizers log advice and per-node notes through ``logging``; zopt reports itself
_quiet_logging = quiet_logging


def _typed(options: ONNXOptions | dict[str, Any] | None) -> ONNXOptions:
    return options if isinstance(options, ONNXOptions) else ONNXOptions.from_dict(options, format="onnx")


def quantize_int8(fp32_model: Path, out_model: Path, options: ONNXOptions | dict[str, Any] | None = None
                  ) -> dict[str, Any]:
    """onnxruntime dynamic INT8 quantization of the MatMuls the policy quantizes; returns stats."""
    ort = _ort()
    options = _typed(options)
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load(str(fp32_model), load_external_data=False)
    body, other = quantizable_matmuls(model, Policy.from_options(options))
    del model
    per_channel = options.per_channel
    quantize_dynamic(str(fp32_model), str(out_model), op_types_to_quantize=["MatMul"], per_channel=per_channel,
                     weight_type=QuantType.QInt8, nodes_to_quantize=body, nodes_to_exclude=other,
                     use_external_data_format=True, extra_options={"MatMulConstBOnly": True})
    return {"quantizer": f"onnxruntime {ort.__version__} quantize_dynamic", "per_channel": per_channel,
            "weight_type": "QInt8", "quantized_matmuls": len(body)}


def quantize_int4(fp32_model: Path, out_model: Path, options: ONNXOptions | dict[str, Any] | None = None
                  ) -> dict[str, Any]:
    """onnxruntime MatMulNBits 4-bit quantization of the MatMuls the policy quantizes; returns stats."""
    ort = _ort()
    options = _typed(options)
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    block = options.block_size
    symmetric = options.symmetric
    model = onnx.load(str(fp32_model))
    body, other = quantizable_matmuls(model, Policy.from_options(options))
    q = MatMulNBitsQuantizer(model, bits=4, block_size=block, is_symmetric=symmetric, nodes_to_exclude=other)
    q.process()
    q.model.save_model_to_file(str(out_model), use_external_data_format=True)
    return {"quantizer": f"onnxruntime {ort.__version__} MatMulNBitsQuantizer", "bits": 4, "block_size": block,
            "symmetric": symmetric, "quantized_matmuls": len(body)}


def _storage_table(model_path: Path) -> dict[str, dict[str, str]]:
    import onnx

    m = onnx.load(str(model_path), load_external_data=False)
    return {i.name: {"storage": onnx.TensorProto.DataType.Name(i.data_type)} for i in m.graph.initializer}


def convert(src: TensorSource, out: Path, subtype: str | None, options: ONNXOptions, progress: bool, *,
            format: str = "onnx") -> Path:
    """Export ``src`` to an ONNX artifact folder ``out`` (``subtype`` in :data:`SUBTYPES`)."""
    sub = (subtype or "fp32").lower()
    if sub not in SUBTYPES:
        raise UnsupportedFormat(f"unknown onnx subtype {subtype!r}; choose one of {', '.join(SUBTYPES)}")
    config = zimage.check_shapes(src)
    with atomic_path(out, is_dir=True) as tmp:
        if sub in ("int8", "int4"):
            _ort()
            work = tmp / "_fp32"
            work.mkdir()
            stats = export(src, work, "fp32", progress)
            quant = quantize_int8 if sub == "int8" else quantize_int4
            with _quiet_logging():
                stats["quantization"] = quant(work / MODEL_NAME, tmp / MODEL_NAME, options)
            shutil.rmtree(work)
        else:
            stats = export(src, tmp, sub, progress, Policy.from_options(options))
        write_config(tmp, config, zopt_only="onnx")
        data = sorted(p.name for p in tmp.iterdir() if p.name not in (MODEL_NAME, "config.json"))
        write_manifest(
            tmp, format="onnx", subtype=sub, options=options.recorded(),
            source=source_provenance(src, options.hash_source), config=config,
            tensors=_storage_table(tmp / MODEL_NAME),
            extra={"onnx": {"model": MODEL_NAME, "external_data": data, "opset": OPSET, **stats,
                            "inputs": {"latents": "float32 (batch, in_channels, height, width), height/width even",
                                       "timestep": "float32 (batch,), the pipeline's t in [0, 1]",
                                       "text_embeds": "float32 (batch, text_tokens, cap_feat_dim), zero padded",
                                       "text_lens": "int64 (batch,), real tokens per row (>= 1)"},
                            "outputs": {"sample": "float32 (batch, in_channels, height, width)"}}},
        )
    return out


def _artifact(path: Path) -> tuple[Path, dict[str, Any]]:
    folder = path / "transformer" if (path / "transformer" / "zopt-manifest.json").exists() else path
    return folder, read_manifest(folder)


def load(path: Path, device: str, backend: str, dtype: Any = None):
    """An :class:`~zopt.formats.onnx.runtime.OrtTransformer` over the artifact at ``path``.

    ``backend``: ``ort-tensorrt`` / ``ort-cuda`` / ``ort-cpu`` (selected by ``zopt.formats.load``).
    ``dtype`` is ignored: the graph's inputs and outputs are float32 whatever its weights.
    """
    _ort()
    from .runtime import OrtTransformer, provider_options

    folder, manifest = _artifact(Path(path))
    verify_manifest(folder, manifest, reads=[f for f in (folder / MODEL_NAME, folder / DATA_NAME)
                                             if f.exists() or f.is_symlink()])
    sub = manifest.get("subtype") or "fp32"
    if sub == "bf16" and backend == "ort-cpu":
        raise UnsupportedFormat("onnx:bf16 needs the CUDA or TensorRT execution provider "
                                "(onnxruntime's CPU provider has no bfloat16 MatMul)", folder)
    run_device = "cpu" if backend == "ort-cpu" else device
    return OrtTransformer(folder / MODEL_NAME, manifest["config"], provider_options(backend, folder, sub), run_device)


def file_bytes(folder: Path) -> int:
    """Bytes of the graph and its external data (what a runtime reads)."""
    return sum((folder / n).stat().st_size for n in (MODEL_NAME, DATA_NAME) if (folder / n).exists())
