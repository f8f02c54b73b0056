"""Merge before converting: a lazy view of a source whose Linear weights come out with LoRAs added.

Every converter reads its source one tensor at a time, so wrapping the source merges each weight
as it streams through (memory: one weight and its dense update), for every format alike. A weight
stored fused (the original layout's ``attention.qkv``) gets the stacked update of its parts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..checkpoint import TensorInfo, TensorSource
from .resolve import Lora, linear_modules, load, stack


class MergedSource(TensorSource):
    """``base`` with ``loras`` merged into its weights: ``W + sum(scale * alpha / rank * B @ A)``,
    computed in float32 and returned in the stored dtype. Names, shapes, dtypes, files and hash
    are the base's; ``loras`` records what was merged."""

    def __init__(self, base: TensorSource, merged: list[Lora], family):
        self.base = base
        self.merged = merged
        self.kind = base.kind
        self.path = base.path
        self.metadata = base.metadata
        self.config = getattr(base, "config", None)
        self._family = family
        self._modules = linear_modules(family.as_diffusers(base))
        self._aliases = family.lora_aliases(list(self._modules))

    @property
    def loras(self) -> list[dict[str, Any]]:
        """Provenance of each merged LoRA: file name, sha256, scale, layout, targets, rank."""
        return [lora.record() for lora in self.merged]

    def __getattr__(self, name: str):
        # a GGUF source's header (checked before converting) and the like; never its raw blocks,
        # which would bypass the merge
        if name in ("raw", "base") or name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.base, name)

    @property
    def files(self) -> list[Path]:
        return self.base.files

    def names(self) -> list[str]:
        return self.base.names()

    def info(self, name: str) -> TensorInfo:
        return self.base.info(name)

    def update(self, name: str):
        """The dense float32 update of stored tensor ``name``, or None if no LoRA touches it."""
        d = self._family.to_diffusers_name(name)
        if not d.endswith(".weight") or len(self.base.info(name).shape) != 2:
            return None
        parts = self._aliases.get(d[: -len(".weight")])
        if parts is None:
            return None
        outs = [self._modules[p][0] for p in parts]
        total = None
        for lora in self.merged:
            fused = stack([lora.branches.get(p) for p in parts], outs, self._modules[parts[0]][1])
            if fused is None:
                continue
            delta = fused.delta(lora.scale)
            total = delta if total is None else total.add_(delta)
        return total

    def get(self, name: str):
        t = self.base.get(name)
        delta = self.update(name)
        if delta is None:
            return t
        return (t.float() + delta.reshape(t.shape)).to(t.dtype)

    def close(self) -> None:
        self.base.close()


def merged_source(src: TensorSource, specs: list, *, allow_pickle: bool = False) -> MergedSource:
    """``src`` with the LoRAs ``specs`` (``FILE[:SCALE]`` strings or LoraSpecs) merged into its
    weights as they are read. Every LoRA is read and checked against the source's family and
    shapes here, before any conversion work (one-line errors naming the LoRA file)."""
    from ..families import detect

    family = detect(src)
    modules = linear_modules(family.as_diffusers(src))
    merged = [load(s, family, modules, allow_pickle=allow_pickle) for s in specs]
    return MergedSource(src, merged, family)
