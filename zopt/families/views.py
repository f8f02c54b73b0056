"""Lazy renamed views of a TensorSource: the building block of every family's key maps."""

from __future__ import annotations

from pathlib import Path

from ..checkpoint import TensorInfo, TensorSource


class MappedSource(TensorSource):
    """A source whose tensors are renamed, split or fused from another source, lazily."""

    def __init__(self, base: TensorSource, plan: dict[str, tuple], layout: str):
        self.base = base
        self.plan = plan  # new name -> ("copy", src) | ("chunk", src, i, n) | ("cat", [srcs]) | ("row", src)
        self.layout = layout
        self.kind = base.kind
        self.path = base.path
        self.metadata = base.metadata
        self.config = getattr(base, "config", None)

    def names(self) -> list[str]:
        return list(self.plan)

    @property
    def files(self) -> list[Path]:
        return self.base.files

    def sources_of(self, name: str) -> list[str]:
        op = self.plan[name]
        return list(op[1]) if op[0] == "cat" else [op[1]]

    def info(self, name: str) -> TensorInfo:
        op = self.plan[name]
        if op[0] == "copy":
            i = self.base.info(op[1])
            return TensorInfo(name, i.shape, i.dtype, i.nbytes)
        if op[0] == "row":
            i = self.base.info(op[1])
            return TensorInfo(name, (1, *i.shape), i.dtype, i.nbytes)
        if op[0] == "chunk":
            i = self.base.info(op[1])
            n = op[3]
            return TensorInfo(name, (i.shape[0] // n, *i.shape[1:]), i.dtype, i.nbytes // n)
        infos = [self.base.info(s) for s in op[1]]
        rows = sum(i.shape[0] for i in infos)
        return TensorInfo(name, (rows, *infos[0].shape[1:]), infos[0].dtype, sum(i.nbytes for i in infos))

    def get(self, name: str):
        import torch

        op = self.plan[name]
        if op[0] == "copy":
            return self.base.get(op[1])
        if op[0] == "row":
            return self.base.get(op[1]).reshape(1, -1)
        if op[0] == "chunk":
            t = self.base.get(op[1])
            return t.chunk(op[3], dim=0)[op[2]]
        return torch.cat([self.base.get(s) for s in op[1]], dim=0)

    def close(self) -> None:
        self.base.close()
