"""Export a Z-Image transformer to ONNX without ever holding its weights in memory.

1. trace a value-free skeleton of the family's graph module (:func:`~zopt.formats.onnx.graph.skeleton`:
   every tensor a zero-stride view) with the TorchScript exporter, ``export_params=False``: the weights become
   graph inputs named by their module path and the graph costs a few MB whatever the model size;
2. turn those inputs into initializers whose bytes live in ``model.onnx.data`` (ONNX external
   data), written one tensor at a time straight from the checkpoint.

Why the TorchScript exporter (``dynamo=False``) and not ``dynamo=True``: on the 2-layer tiny model
the torch.export-based exporter took 95 s (symbolic shape reasoning per op) against 9 s, and it
cannot translate a remainder by a symbolic size (``aten.remainder.Scalar`` on a SymInt). The
TorchScript tracer records the shape arithmetic (``Shape``/``Gather``/``Div`` ops), so one trace
serves every batch size, resolution and text length, which the parity tests check.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ...checkpoint import TensorSource
from ...families import detect as detect_family
from ...progress import progress_bar

OPSET = 18  # newest opset both onnxruntime 1.2x and TensorRT 10's ONNX parser fully cover
MODEL_NAME = "model.onnx"
DATA_NAME = "model.onnx.data"
INPUT_NAMES = ("latents", "timestep", "text_embeds", "text_lens")
OUTPUT_NAME = "sample"
DYNAMIC_AXES = {
    "latents": {0: "batch", 2: "height", 3: "width"},
    "timestep": {0: "batch"},
    "text_embeds": {0: "batch", 1: "text_tokens"},
    "text_lens": {0: "batch"},
    "sample": {0: "batch", 2: "height", 3: "width"},
}
ALIGN = 4096  # external tensors start on page boundaries so readers can mmap them

HALF = {"fp32": None, "fp16": "float16", "bf16": "bfloat16"}


def trace_graph(config: dict[str, Any], precision: str, path: Path, policy: Any = None) -> dict[str, Any]:
    """Trace the skeleton for ``config`` and write the weight-less graph to ``path`` (``policy``:
    which Linear weights a half-precision export casts, see :func:`~zopt.formats.onnx.graph.half_policy`).

    Returns ``{input name: (shape, torch dtype)}`` for every weight input of the traced graph.
    """
    import torch

    from .graph import graph_inputs, skeleton

    half = getattr(torch, HALF[precision]) if HALF[precision] else None
    g = skeleton(config, half, policy)
    # small, unequal trace shapes: 2 rows with different text lengths exercise the masks
    args = graph_inputs(config, batch=2, height=8, width=6, text_len=37)
    shapes = {n: (tuple(t.shape), t.dtype) for n, t in list(g.named_parameters()) + list(g.named_buffers())}
    import warnings

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation and tracer notes
        torch.onnx.export(g, args, str(path), input_names=list(INPUT_NAMES), output_names=[OUTPUT_NAME],
                          opset_version=OPSET, dynamo=False, dynamic_axes=DYNAMIC_AXES,
                          export_params=False, do_constant_folding=False,
                          keep_initializers_as_inputs=True)  # no value-based dedup of the hollow tensors
    return shapes


def _source_tensor(d: TensorSource, tables: dict[str, Any], name: str):
    """The value of graph weight ``name`` (``model.X.weight_t`` is ``X.weight`` transposed)."""
    if name in tables:
        return tables[name]
    key = name.removeprefix("model.")
    if key.endswith(".weight_t"):
        return d.get(key[: -len("_t")]).t()
    return d.get(key)


def _onnx_dtype(dtype) -> int:
    import onnx
    import torch

    return {torch.float32: onnx.TensorProto.FLOAT, torch.float16: onnx.TensorProto.FLOAT16,
            torch.bfloat16: onnx.TensorProto.BFLOAT16}[dtype]


def _tensor_buffer(t):
    """A contiguous numpy view of ``t`` (written without another copy)."""
    import torch

    t = t.contiguous().cpu()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: write the raw 16-bit patterns
        t = t.view(torch.int16)
    return t.numpy()


def export(src: TensorSource, folder: Path, precision: str = "fp32", progress: bool = True,
           policy: Any = None) -> dict[str, Any]:
    """Write ``folder/model.onnx`` + ``folder/model.onnx.data`` for ``src``; returns export stats.
    ``policy`` (a :class:`zopt.policy.Policy`) says which weights a fp16/bf16 export casts.

    Memory stays at one tensor (plus the trace's activations on tiny inputs) at every model size.
    """
    import onnx

    from .graph import graph_tables

    family = detect_family(src)
    config = family.check_shapes(src)
    if config.get("siglip_feat_dim"):
        from ...errors import UnsupportedFormat

        raise UnsupportedFormat("the ONNX export covers text-to-image Z-Image; the Omni (SigLIP) variant is not "
                                "supported", src.path)
    d = family.as_diffusers(src)
    t0 = time.perf_counter()
    model_path = folder / MODEL_NAME
    shapes = trace_graph(config, precision, model_path, policy)
    trace_s = time.perf_counter() - t0

    proto = onnx.load(str(model_path), load_external_data=False)
    graph = proto.graph
    io = set(INPUT_NAMES)
    weights = [i for i in graph.input if i.name not in io]
    tables = graph_tables(config)
    offset = 0
    with open(folder / DATA_NAME, "wb") as f, progress_bar(len(weights), f"export onnx:{precision}", unit="",
                                                            enabled=progress) as bar:
        for inp in weights:
            shape, dtype = shapes[inp.name]
            t = _source_tensor(d, tables, inp.name).to(dtype)
            if tuple(t.shape) != shape:
                from ...errors import ShapeMismatch

                raise ShapeMismatch(f"tensor for {inp.name} has shape {tuple(t.shape)}, expected {shape}", src.path)
            pad = (-offset) % ALIGN
            f.write(b"\0" * pad)
            offset += pad
            data = _tensor_buffer(t)
            f.write(data.data)
            init = onnx.TensorProto(name=inp.name, dims=list(shape), data_type=_onnx_dtype(dtype))
            init.data_location = onnx.TensorProto.EXTERNAL
            for k, v in (("location", DATA_NAME), ("offset", str(offset)), ("length", str(data.nbytes))):
                init.external_data.add(key=k, value=v)
            graph.initializer.append(init)
            offset += data.nbytes
            del t, data
            bar.advance()
    for inp in weights:
        graph.input.remove(inp)
    proto.producer_name = "zopt"
    onnx.save(proto, str(model_path))
    return {"opset": OPSET, "exporter": "torch.onnx (TorchScript tracer)", "trace_seconds": round(trace_s, 2),
            "weights": len(weights), "data_bytes": offset, "precision": precision}
