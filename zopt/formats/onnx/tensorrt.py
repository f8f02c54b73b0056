"""TensorRT engines built from the ONNX export, and the module that runs them in the pipeline.

``zopt convert SRC --to tensorrt[:bf16|fp16|fp8|int8] -o DIR`` exports the graph
(:mod:`zopt.formats.onnx.export`), then builds a *strongly typed* engine with the tensorrt Python
API, so the engine keeps exactly the precisions the ONNX file states:

* ``bf16`` / ``fp16``: the half-precision export (matmuls in half, sensitive ops in fp32);
* ``int8`` / ``fp8``: the fp32 export with QuantizeLinear/DequantizeLinear pairs on the inputs
  and weights of the body's MatMuls (``onnxruntime.quantization.quantize_static``, QDQ format,
  symmetric, per-channel weights, activation scales calibrated on CPU). TensorRT fuses each pair
  into an int8/fp8 GEMM; onnxruntime's CPU provider runs the same file, which is how its error is
  measured without a GPU.

One optimization profile covers a resolution range: latent sides from ``min_size`` to
``max_size`` pixels (each side independently), batch ``1..max_batch`` and text ``1..max_text``
tokens, tuned for ``opt_*``. Engines are specific to the GPU and TensorRT version that built them;
the manifest records both.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..._io import atomic_path
from ...checkpoint import TensorSource
from ...errors import CorruptFile, MissingDependency, ShapeMismatch, UnsupportedFormat, ZoptError
from ...families import zimage
from ..artifact import read_manifest, source_provenance, verify_manifest, write_config, write_manifest
from ..options import Options

ENGINE_NAME = "model.plan"
SUBTYPES = {
    "bf16": (16.0, "bf16 matmuls, fp32 norms/softmax/RoPE/embedders (strongly typed)"),
    "fp16": (16.0, "fp16 matmuls, fp32 norms/softmax/RoPE/embedders (strongly typed)"),
    "fp8": (8.0, "FP8 E4M3 Q/DQ on body matmuls (weights per-channel, calibrated activations); Ada/Hopper+"),
    "int8": (8.0, "INT8 Q/DQ on body matmuls (weights per-channel, calibrated activations)"),
}
VAE_SCALE = 8  # Z-Image's VAE downsamples 8x; the transformer then packs 2x2 latent patches


def list_types() -> list[tuple[str, float, str]]:
    return [(k, bits, summary) for k, (bits, summary) in SUBTYPES.items()]


@dataclass(frozen=True)
class ShapeRange:
    """The shapes an engine accepts: image sides in pixels, batch rows, text tokens (min/opt/max)."""

    min_size: int = 512
    opt_size: int = 1024
    max_size: int = 1536
    min_batch: int = 1
    opt_batch: int = 1
    max_batch: int = 2  # classifier-free guidance doubles the batch
    min_text: int = 1
    opt_text: int = 128
    max_text: int = 512

    @classmethod
    def from_options(cls, options: Any) -> ShapeRange:
        """The range a :class:`TensorRTOptions` (or a dict of the same keys) asks for."""
        get = options.get if isinstance(options, dict) else lambda k, d: getattr(options, k, d)
        return cls(**{k: int(get(k, f.default)) for k, f in cls.__dataclass_fields__.items()})


@dataclass(frozen=True)
class TensorRTOptions(Options):
    """The engine's shape profile (image sides in pixels, batch rows, text tokens: min/opt/max),
    INT8/FP8 calibration and the builder's workspace."""

    min_size: int = ShapeRange.min_size
    opt_size: int = ShapeRange.opt_size
    max_size: int = ShapeRange.max_size
    min_batch: int = ShapeRange.min_batch
    opt_batch: int = ShapeRange.opt_batch
    max_batch: int = ShapeRange.max_batch
    min_text: int = ShapeRange.min_text
    opt_text: int = ShapeRange.opt_text
    max_text: int = ShapeRange.max_text
    calibration: str | None = None  # .npz of latents/timestep/text_embeds/text_lens (default: synthetic)
    calibration_latent: int = 32  # latent side of the synthetic calibration inputs
    calibration_samples: int = 4
    workspace_gb: float = 8.0


def profile_shapes(config: dict[str, Any], rng: ShapeRange) -> dict[str, tuple[tuple[int, ...], ...]]:
    """``{input name: (min shape, opt shape, max shape)}`` for one TensorRT optimization profile.

    Raises ZoptError when the range is inconsistent or exceeds the model's RoPE tables.
    """
    sizes, batches, texts = ((rng.min_size, rng.opt_size, rng.max_size), (rng.min_batch, rng.opt_batch, rng.max_batch),
                             (rng.min_text, rng.opt_text, rng.max_text))
    for label, (lo, mid, hi) in (("size", sizes), ("batch", batches), ("text", texts)):
        if not 1 <= lo <= mid <= hi:
            raise ZoptError(f"TensorRT profile needs 1 <= min_{label} <= opt_{label} <= max_{label}, got {lo}/{mid}/{hi}")
    step = VAE_SCALE * 2
    bad = [s for s in sizes if s % step]
    if bad:
        raise ZoptError(f"image sides must be multiples of {step} pixels (VAE 8x, patch 2); got {bad}")
    pad = 32  # the graph pads captions to a multiple of 32 tokens; image rows start after them
    if -(-rng.max_text // pad) * pad + 1 >= config["axes_lens"][0]:
        raise ZoptError(f"max_text {rng.max_text} exceeds the model's RoPE range ({config['axes_lens'][0]} positions)")
    if rng.max_size // step > min(config["axes_lens"][1:]):
        raise ZoptError(f"max_size {rng.max_size} exceeds the model's RoPE range "
                        f"({min(config['axes_lens'][1:])} patches per side)")
    c, cap = config["in_channels"], config["cap_feat_dim"]
    lat = [s // VAE_SCALE for s in sizes]
    return {
        "latents": tuple((b, c, s, s) for b, s in zip(batches, lat, strict=True)),
        "timestep": tuple((b,) for b in batches),
        "text_embeds": tuple((b, n, cap) for b, n in zip(batches, texts, strict=True)),
        "text_lens": tuple((b,) for b in batches),
    }


def image_tokens(rng: ShapeRange) -> tuple[int, int, int]:
    """Image tokens (before padding) at the min/opt/max square size."""
    return tuple((s // (VAE_SCALE * 2)) ** 2 for s in (rng.min_size, rng.opt_size, rng.max_size))


def _trt():
    try:
        import tensorrt

        return tensorrt
    except ImportError:
        raise MissingDependency("tensorrt", "tensorrt", "building and running TensorRT engines") from None


# ---------------------------------------------------------------------------------------------
# Q/DQ for int8 / fp8


def calibration_feeds(config: dict[str, Any], options: TensorRTOptions | dict[str, Any]) -> list[dict[str, Any]]:
    """Inputs for activation calibration: ``calibration=FILE.npz`` (arrays latents, timestep,
    text_embeds, text_lens, each with a leading sample axis) or a seeded synthetic set: unit-normal
    latents (the noise the sampler starts from), timesteps across [0, 1], unit-normal text.
    ``options``: :class:`TensorRTOptions` or a dict of them."""
    import numpy as np

    if isinstance(options, dict):
        options = TensorRTOptions.from_dict(options, format="tensorrt")

    from .graph import graph_inputs

    path = options.calibration
    if path:
        try:
            data = np.load(path)
            n = len(data["latents"])
            return [{k: data[k][i] for k in ("latents", "timestep", "text_embeds", "text_lens")} for i in range(n)]
        except (OSError, KeyError, ValueError) as e:
            raise CorruptFile(f"not a calibration .npz with latents/timestep/text_embeds/text_lens ({e})", path) from None
    side = options.calibration_latent
    feeds = []
    for i in range(options.calibration_samples):
        lat, t, emb, lens = graph_inputs(config, 1, side, side, 64, seed=100 + i)
        t[:] = (i + 0.5) / options.calibration_samples
        feeds.append({"latents": lat.numpy(), "timestep": t.numpy(), "text_embeds": emb.numpy(),
                      "text_lens": lens.numpy()})
    return feeds


def qdq_model(fp32_model: Path, out_model: Path, precision: str, feeds: list[dict[str, Any]],
              policy: Any = None) -> dict[str, Any]:
    """Write a QDQ copy of the fp32 export with int8 or fp8 (E4M3) Q/DQ around the body's MatMuls."""
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    from ...policy import Policy
    from . import _quiet_logging, quantizable_matmuls

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(feeds)

        def get_next(self):
            return next(self.it, None)

    model = onnx.load(str(fp32_model), load_external_data=False)
    body, other = quantizable_matmuls(model, policy or Policy())
    del model
    qtype = QuantType.QFLOAT8E4M3FN if precision == "fp8" else QuantType.QInt8
    # fp8 scales come from the distribution's std (ORT requires it for float8); int8 from min/max
    method = CalibrationMethod.Distribution if precision == "fp8" else CalibrationMethod.MinMax
    with _quiet_logging(), contextlib.redirect_stdout(io.StringIO()):  # the calibrator prints progress
        quantize_static(str(fp32_model), str(out_model), Reader(), quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=["MatMul"], per_channel=True, activation_type=qtype, weight_type=qtype,
                        nodes_to_quantize=body, nodes_to_exclude=other, use_external_data_format=True,
                        calibrate_method=method,
                        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "MatMulConstBOnly": True})
    return {"quantizer": f"onnxruntime {ort.__version__} quantize_static (QDQ)", "type": qtype.name,
            "calibration": method.name, "calibration_samples": len(feeds), "quantized_matmuls": len(body)}


# ---------------------------------------------------------------------------------------------
# engine build


def build_engine(onnx_path: Path, engine_path: Path, shapes: dict[str, tuple[tuple[int, ...], ...]],
                 workspace_gb: float = 8.0) -> dict[str, Any]:
    """Parse ``onnx_path`` (external data beside it) and build a strongly typed engine to ``engine_path``."""
    trt = _trt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(os.fspath(onnx_path)):
        errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise CorruptFile(f"TensorRT cannot parse the ONNX graph: {errs[:400]}", onnx_path)
    cfg = builder.create_builder_config()
    cfg.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    profile = builder.create_optimization_profile()
    for name, (lo, mid, hi) in shapes.items():
        profile.set_shape(name, lo, mid, hi)
    cfg.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, cfg)
    if plan is None:
        raise ZoptError("TensorRT failed to build the engine (see its log above)", onnx_path)
    engine_path.write_bytes(bytes(plan))
    return {"tensorrt": trt.__version__, "layers": network.num_layers}


def _gpu() -> dict[str, Any]:
    import torch

    if not torch.cuda.is_available():
        raise UnsupportedFormat("building a TensorRT engine needs an NVIDIA GPU (none found)")
    return {"gpu": torch.cuda.get_device_name(), "compute_capability": list(torch.cuda.get_device_capability())}


def convert(src: TensorSource, out: Path, subtype: str | None, options: TensorRTOptions, progress: bool, *,
            format: str = "tensorrt") -> Path:
    """Export ``src`` to ONNX and build a TensorRT engine folder at ``out``."""
    from .export import MODEL_NAME, export

    sub = (subtype or "bf16").lower()
    if sub not in SUBTYPES:
        raise UnsupportedFormat(f"unknown tensorrt subtype {subtype!r}; choose one of {', '.join(SUBTYPES)}")
    _trt()
    gpu = _gpu()
    if sub == "fp8" and tuple(gpu["compute_capability"]) < (8, 9):
        raise UnsupportedFormat(f"TensorRT fp8 needs compute capability >= 8.9; this GPU is {gpu['compute_capability']}")
    config = zimage.check_shapes(src)
    rng = ShapeRange.from_options(options)
    shapes = profile_shapes(config, rng)
    with atomic_path(out, is_dir=True) as tmp:
        work = tmp / "_onnx"
        work.mkdir()
        from ...policy import Policy

        policy = Policy.from_options(options)
        stats = export(src, work, sub if sub in ("bf16", "fp16") else "fp32", progress, policy)
        graph = work / MODEL_NAME
        if sub in ("int8", "fp8"):
            stats["quantization"] = qdq_model(graph, work / "qdq.onnx", sub, calibration_feeds(config, options), policy)
            graph = work / "qdq.onnx"
        stats.update(build_engine(graph, tmp / ENGINE_NAME, shapes, options.workspace_gb))
        shutil.rmtree(work)
        write_config(tmp, config, zopt_only="tensorrt")
        write_manifest(tmp, format="tensorrt", subtype=sub, options=options.recorded(),
                       source=source_provenance(src, options.hash_source), config=config,
                       tensors={}, extra={"tensorrt": {**stats, **gpu, "profile": asdict(rng),
                                                       "profile_shapes": {k: [list(s) for s in v] for k, v in shapes.items()},
                                                       "image_tokens": list(image_tokens(rng))}})
    return out


# ---------------------------------------------------------------------------------------------
# runtime


def _check_in_profile(shapes: dict[str, Any], name: str, shape: tuple[int, ...]) -> None:
    lo, _, hi = shapes[name]
    if len(shape) != len(lo) or any(not a <= s <= b for s, a, b in zip(shape, lo, hi, strict=True)):
        raise ShapeMismatch(f"{name} shape {shape} is outside the engine's profile {tuple(lo)}..{tuple(hi)}; "
                            "rebuild with other min_/max_ options")


def _transformer_class():
    from .runtime import GraphTransformer

    class TensorRTTransformer(GraphTransformer):
        """A deserialized engine run with ``execute_async_v3`` on torch's current CUDA stream."""

        def __init__(self, engine_path: Path, config: dict[str, Any], shapes: dict[str, Any], device: str = "cuda"):
            super().__init__(config, device)
            trt = _trt()
            self.logger = trt.Logger(trt.Logger.WARNING)
            self.runtime = trt.Runtime(self.logger)
            self.engine = self.runtime.deserialize_cuda_engine(engine_path.read_bytes())
            if self.engine is None:
                raise CorruptFile("TensorRT cannot deserialize the engine (other GPU or TensorRT version?)", engine_path)
            self.context = self.engine.create_execution_context()
            self.shapes = shapes

        def run(self, latents, timestep, text_embeds, text_lens):
            import torch

            dev = torch.device("cuda")
            feeds = {"latents": latents, "timestep": timestep, "text_embeds": text_embeds, "text_lens": text_lens}
            keep = []
            for name, t in feeds.items():
                _check_in_profile(self.shapes, name, tuple(t.shape))
                t = t.to(dev).contiguous()
                keep.append(t)
                self.context.set_input_shape(name, tuple(t.shape))
                self.context.set_tensor_address(name, t.data_ptr())
            out = torch.empty(tuple(self.context.get_tensor_shape("sample")), dtype=torch.float32, device=dev)
            self.context.set_tensor_address("sample", out.data_ptr())
            stream = torch.cuda.current_stream()
            if not self.context.execute_async_v3(stream.cuda_stream):
                raise ZoptError("TensorRT execution failed")
            stream.synchronize()
            return out.cpu()

    return TensorRTTransformer


def load(path: Path, device: str, backend: str, dtype: Any = None):
    """The engine at ``path`` as a pipeline transformer (``dtype`` ignored: fp32 inputs/outputs);
    ``backend`` (always ``tensorrt``) was selected by ``zopt.formats.load``."""
    _trt()

    folder = Path(path)
    manifest = read_manifest(folder)
    verify_manifest(folder, manifest, reads=[folder / ENGINE_NAME])
    shapes = {k: [tuple(s) for s in v] for k, v in manifest["tensorrt"]["profile_shapes"].items()}
    return _transformer_class()(folder / ENGINE_NAME, manifest["config"], shapes, "cuda")
