"""A LoRA file matched against one model: a low-rank :class:`Branch` per diffusers Linear layer.

The family's key map says which Linear layers a module path names. A path that names a fused
layer (Z-Image's original ``attention.qkv``) is split: the up matrix's rows go to to_q, to_k and
to_v, which share the down matrix. The reverse, a fused weight updated by separate q/k/v LoRAs, is
:func:`stack`: the downs concatenated and the ups block-diagonal, one low-rank update whose rows
are those of the parts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ShapeMismatch
from .files import LoraError, LoraFile, LoraSpec, read

# metadata keys trainers write naming the model a LoRA was trained for
_BASE_MODEL_KEYS = ("ss_base_model_version", "modelspec.architecture", "base_model", "ss_sd_model_name")


@dataclass
class Branch:
    """``factor * up @ down``: the update of one Linear weight (out, in) at scale 1."""

    down: Any  # torch.Tensor (rank, in), float32
    up: Any  # torch.Tensor (out, rank), float32
    factor: float = 1.0

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def delta(self, scale: float = 1.0):
        """The dense (out, in) update at ``scale``, float32."""
        return (self.up @ self.down) * (self.factor * scale)


def stack(parts: list[Branch | None], outs: list[int], in_features: int) -> Branch | None:
    """One low-rank update of a fused weight whose rows are ``parts``' weights stacked in order
    (q, k, v -> qkv): downs concatenated (sum of ranks, in), ups placed block-diagonally (sum of
    outs, sum of ranks) with each factor folded in; a part without a branch contributes zero rows.
    None when no part has a branch."""
    import torch

    have = [b for b in parts if b is not None]
    if not have:
        return None
    down = torch.cat([b.down for b in have], 0)
    up = torch.zeros(sum(outs), down.shape[0], dtype=down.dtype)
    row = col = 0
    for b, out in zip(parts, outs, strict=True):
        if b is not None:
            up[row:row + out, col:col + b.rank] = b.up * b.factor
            col += b.rank
        row += out
    return Branch(down, up, 1.0)


def _combine(a: Branch, b: Branch) -> Branch:
    """Two updates of the same layer (a file naming both qkv and to_q) as one of summed rank."""
    import torch

    return Branch(torch.cat([a.down, b.down], 0), torch.cat([a.up * a.factor, b.up * b.factor], 1), 1.0)


@dataclass
class Lora:
    """A LoRA resolved against a model: its branches by diffusers module path, and its provenance."""

    path: Path
    sha256: str
    scale: float
    layout: str  # "peft" | "kohya"
    targets: str  # "fused qkv" | "separate q/k/v" | "no attention"
    branches: dict[str, Branch] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def rank(self) -> int:
        return max((b.rank for b in self.branches.values()), default=0)

    def num_params(self) -> int:
        return sum(b.down.numel() + b.up.numel() for b in self.branches.values())

    def record(self) -> dict[str, Any]:
        """What an artifact records about a merged LoRA."""
        return {"file": self.name, "sha256": self.sha256, "scale": self.scale, "layout": self.layout,
                "targets": self.targets, "rank": self.rank, "modules": len(self.branches)}


def _listing(keys: list[str], n: int = 3) -> str:
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(repr(k) for k in keys[:n]) + more


def resolve(lf: LoraFile, scale: float, family, modules: dict[str, tuple[int, int]]) -> Lora:
    """Match LoRA file ``lf`` against a model of ``family`` whose Linear layers are ``modules``
    (diffusers path -> (out, in)). Raises a LoraError naming the file for a LoRA made for another
    model (no module matches), for modules this model lacks, and for matrices of the wrong size."""
    aliases = family.lora_aliases(list(modules))
    unknown = [k for k in lf.pairs if k not in aliases]
    if len(unknown) == len(lf.pairs):
        base = next((f"{k}={lf.metadata[k]}" for k in _BASE_MODEL_KEYS if lf.metadata.get(k)), None)
        hint = f"; the file says {base}" if base else ""
        raise LoraError(f"targets no layer of a {family.name} model (e.g. {_listing(unknown, 2)}): a LoRA for "
                        f"another model{hint}", lf.path)
    if unknown:
        raise LoraError(f"targets {len(unknown)} module(s) this {family.name} model does not have: "
                        f"{_listing(sorted(unknown))}", lf.path)
    branches: dict[str, Branch] = {}
    fused = separate = False
    for key, pair in lf.pairs.items():
        parts = aliases[key]
        outs = [modules[p][0] for p in parts]
        in_f = modules[parts[0]][1]
        if pair.down.shape[1] != in_f or pair.up.shape[0] != sum(outs):
            raise ShapeMismatch(f"LoRA module {key!r} updates a {pair.up.shape[0]}x{pair.down.shape[1]} weight "
                                f"but this model's layer is {sum(outs)}x{in_f}: a LoRA for another model size",
                                lf.path)
        if len(parts) > 1:
            fused = True
        elif any(s in parts[0] for s in (".to_q", ".to_k", ".to_v")):
            separate = True
        for p, up in zip(parts, pair.up.split(outs, 0), strict=True):
            b = Branch(pair.down, up.contiguous(), pair.factor)
            branches[p] = _combine(branches[p], b) if p in branches else b
    targets = "fused qkv" if fused else "separate q/k/v" if separate else "no attention"
    return Lora(lf.path, lf.sha256, scale, lf.layout, targets, branches)


def load(spec: LoraSpec | str, family, modules: dict[str, tuple[int, int]], *, allow_pickle: bool = False) -> Lora:
    """Read LoRA ``spec`` (``FILE[:SCALE]``) and resolve it against ``modules`` of ``family``."""
    spec = LoraSpec.parse(spec)
    return resolve(read(spec, family.lora_prefixes, allow_pickle=allow_pickle), spec.scale, family, modules)


def linear_modules(src) -> dict[str, tuple[int, int]]:
    """Diffusers paths and (out, in) of the Linear layers of a diffusers-layout TensorSource
    (every 2-D ``*.weight``)."""
    out = {}
    for n in src.names():
        shape = src.info(n).shape
        if n.endswith(".weight") and len(shape) == 2:
            out[n[: -len(".weight")]] = (int(shape[0]), int(shape[1]))
    return out
