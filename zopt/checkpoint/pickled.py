"""Pickle checkpoints (opt-in only, loaded with ``weights_only=True``)."""

from __future__ import annotations

from pathlib import Path

from .. import validate
from ..errors import CorruptFile
from .base import SAFETENSORS_DTYPES, TensorInfo, TensorSource, _short

# --------------------------------------------------------------------------------------------
# pickle (opt-in only)


class PickleSource(TensorSource):
    kind = "pickle"

    def __init__(self, path: Path):
        import torch

        self.path = path
        self.metadata = {}
        validate.regular_file(path)
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:
            raise CorruptFile(f"cannot be loaded with weights_only=True ({_short(e)})", path) from None
        if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict) or not all(hasattr(v, "shape") for v in obj.values()):
            raise CorruptFile("does not hold a flat dict of tensors", path)
        self._sd = obj

    def names(self) -> list[str]:
        return list(self._sd)

    def info(self, name: str) -> TensorInfo:
        t = self._sd[name]
        dtype = {v[0]: k for k, v in SAFETENSORS_DTYPES.items()}.get(str(t.dtype).replace("torch.", ""), "F32")
        return TensorInfo(name, tuple(t.shape), dtype, t.numel() * t.element_size())

    def get(self, name: str):
        return self._sd[name]


