"""An onnxruntime session that stands in for ``ZImageTransformer2DModel`` inside ``ZImagePipeline``.

The pipeline calls ``transformer(x_list, t, cap_list, return_dict=False)[0]`` with one latent
``(C, 1, H, W)`` and one caption ``(L_i, cap_dim)`` per batch row, and reads ``.dtype``,
``.device``, ``.config`` and ``.in_channels``. :class:`OrtTransformer` packs those lists into the
graph's plain tensors (zero-padded captions + lengths) and unpacks the result.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from diffusers.models.modeling_utils import ModelMixin

from ...errors import CorruptFile, ShapeMismatch

# backend name -> onnxruntime providers, most preferred first (CPU is always the fallback)
PROVIDERS = {
    "ort-tensorrt": ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"),
    "ort-cuda": ("CUDAExecutionProvider", "CPUExecutionProvider"),
    "ort-migraphx": ("MIGraphXExecutionProvider", "ROCMExecutionProvider", "CPUExecutionProvider"),
    "ort-rocm": ("ROCMExecutionProvider", "CPUExecutionProvider"),
    "ort-cpu": ("CPUExecutionProvider",),
}


def provider_options(backend: str, folder: Path, precision: str) -> list[Any]:
    """The ``providers=`` list for ``backend``; TensorRT caches its engines outside the artifact."""
    from ..._io import cache_dir

    out: list[Any] = []
    for name in PROVIDERS[backend]:
        if name == "TensorrtExecutionProvider":
            cache = cache_dir() / "ort-trt" / folder.resolve().name
            cache.mkdir(parents=True, exist_ok=True)
            # no trt_fp16_enable: it would let TensorRT run the fp32 (sensitive) ops in fp16 too;
            # the graph's own types already put the body matmuls in half precision
            out.append((name, {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache)}))
        else:
            out.append(name)
    return out


class GraphTransformer(ModelMixin):
    """Base of runtime modules over the exported graph: list packing, ``.config``/``.dtype``/``.device``.

    ``forward(x, t, cap_feats, return_dict=False) -> (list of (C, 1, H, W) tensors,)``. A
    ``ModelMixin`` only because ``DiffusionPipeline.from_pretrained`` accepts nothing else as its
    transformer; it holds no torch parameters. Subclasses provide ``run(latents (B,C,H,W) f32,
    timestep (B,) f32, text_embeds (B,L,cap) f32, text_lens (B,) i64) -> (B,C,H,W) f32`` on CPU tensors.
    """

    def __init__(self, config: dict[str, Any], device: str = "cpu"):
        super().__init__()
        from diffusers.configuration_utils import FrozenDict

        self.config = FrozenDict(dict(config))
        self.in_channels = config["in_channels"]
        self._device = torch.device(device)

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32  # graph inputs/outputs are fp32 whatever the weights' precision

    @property
    def device(self) -> torch.device:
        return self._device

    def forward(self, x: list[torch.Tensor], t: torch.Tensor, cap_feats: list[torch.Tensor], return_dict: bool = True,
                **_: Any):
        if len(x) != len(cap_feats):
            raise ShapeMismatch(f"{len(x)} latents but {len(cap_feats)} captions")
        t = t.reshape(-1).expand(len(x)) if t.numel() == 1 else t.reshape(-1)
        out: list[torch.Tensor | None] = [None] * len(x)
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, xi in enumerate(x):  # one graph call per latent shape (the pipeline sends one shape)
            if xi.ndim != 4 or xi.shape[1] != 1 or xi.shape[2] % 2 or xi.shape[3] % 2:
                raise ShapeMismatch(f"latent {i} has shape {tuple(xi.shape)}; expected (C, 1, H, W), H and W even")
            groups.setdefault(tuple(xi.shape), []).append(i)
        for idx in groups.values():
            lat = torch.stack([x[i][:, 0] for i in idx]).float().cpu()
            caps = [cap_feats[i].float().cpu() for i in idx]
            if min(len(c) for c in caps) < 1:
                raise ShapeMismatch("empty caption: at least one text token is needed")
            emb = torch.zeros(len(idx), max(len(c) for c in caps), caps[0].shape[-1])
            for r, c in enumerate(caps):
                emb[r, : len(c)] = c
            lens = torch.tensor([len(c) for c in caps], dtype=torch.int64)
            res = self.run(lat, t[idx].float().cpu(), emb, lens)
            for r, i in enumerate(idx):
                out[i] = res[r][:, None].to(device=x[i].device, dtype=x[i].dtype)
        if return_dict:
            from diffusers.models.modeling_outputs import Transformer2DModelOutput

            return Transformer2DModelOutput(sample=out)
        return (out,)


class OrtTransformer(GraphTransformer):
    """The exported graph in an onnxruntime ``InferenceSession`` (any execution provider)."""

    def __init__(self, model_path: Path, config: dict[str, Any], providers: list[Any], device: str = "cpu",
                 threads: int | None = None):
        super().__init__(config, device)
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(os.fspath(model_path), opts, providers=providers)
        except Exception as e:  # onnxruntime raises its own exception types; report one line
            raise CorruptFile(f"onnxruntime cannot open the model: {str(e).splitlines()[0][:300]}", model_path) from None
        self.providers = self.session.get_providers()
        self._inputs = [i.name for i in self.session.get_inputs()]

    def run(self, latents, timestep, text_embeds, text_lens):
        arrays = (latents.numpy(), timestep.numpy(), text_embeds.numpy(), text_lens.numpy())
        return torch.from_numpy(self.session.run(None, dict(zip(self._inputs, arrays, strict=True)))[0])
