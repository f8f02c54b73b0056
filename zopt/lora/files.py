"""LoRA files: ``FILE[:SCALE]`` specs, reading, and the key layouts people publish.

A LoRA file holds, per Linear layer, a down matrix ``A`` (rank x in), an up matrix ``B``
(out x rank) and optionally ``alpha``; the update is ``scale * alpha / rank * B @ A`` (no alpha:
alpha = rank). Layouts recognized by their keys:

* **diffusers / PEFT**: ``<module>.lora_A.weight`` / ``<module>.lora_B.weight`` (also with a PEFT
  adapter name, ``lora_A.default.weight``), optional ``<module>.alpha``;
* **kohya / ComfyUI**: ``<module>.lora_down.weight`` / ``<module>.lora_up.weight`` /
  ``<module>.alpha``, module paths often flattened as ``lora_unet_layers_0_attention_qkv``.

Model prefixes before the module path (``transformer.``, ``diffusion_model.``...) are the family's
(:attr:`zopt.families.Family.lora_prefixes`); which module a path names is the family's key map.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ZoptError

# kohya's own prefixes: the network module a flattened path belongs to
KOHYA_PREFIXES = ("lora_unet_", "lora_transformer_", "lora_te_")
_KEY = re.compile(r"^(?P<module>.+?)\.(?:(?P<kind>lora_A|lora_B|lora_down|lora_up)(?:\.[A-Za-z0-9_-]+)?\.weight"
                  r"|(?P<alpha>alpha))$")
# tensor kinds of other adapter types (LoKr, LoHa, DoRA, full diffs): refused by name, not guessed at
_OTHER_KINDS = ("lokr_", "hada_", "dora_scale", "lora_mid", ".diff", ".diff_b", ".lora_A.bias", ".lora_B.bias")


class LoraError(ZoptError):
    """A LoRA file or spec that zopt cannot use: the message names the file and the problem."""


@dataclass(frozen=True)
class LoraSpec:
    """A LoRA file and the strength it is applied with (``FILE[:SCALE]`` on the command line)."""

    path: Path
    scale: float = 1.0

    @classmethod
    def parse(cls, text: str | os.PathLike | LoraSpec) -> LoraSpec:
        """``"style.safetensors:0.8"`` -> (style.safetensors, 0.8); a missing scale is 1.0; a
        scale that is not a finite number is a LoraError. A path that exists as given is a file
        (so a name with a colon in it still works)."""
        if isinstance(text, LoraSpec):
            return text
        if isinstance(text, os.PathLike) or Path(text).exists():
            return cls(Path(text))
        head, sep, tail = str(text).rpartition(":")
        if not sep or not head or "/" in tail or "\\" in tail:
            return cls(Path(text))
        try:
            scale = float(tail)
        except ValueError:
            raise LoraError(f"LoRA scale {tail!r} is not a number (use FILE[:SCALE], e.g. {head}:0.8)", head) from None
        if not math.isfinite(scale):
            raise LoraError(f"LoRA scale {tail!r} is not a finite number", head)
        return cls(Path(head), scale)


@dataclass
class LoraPair:
    """The low-rank update one file holds for one module path (as the file names it)."""

    key: str
    down: Any = None  # torch.Tensor (rank, in)
    up: Any = None  # torch.Tensor (out, rank)
    alpha: float | None = None

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def factor(self) -> float:
        """alpha / rank (1.0 without alpha)."""
        return 1.0 if self.alpha is None else self.alpha / self.rank


@dataclass
class LoraFile:
    """A LoRA file read into memory: its pairs by module path (prefixes removed)."""

    path: Path
    sha256: str
    layout: str  # "peft" | "kohya"
    pairs: dict[str, LoraPair] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.path.name


def strip_module_prefixes(key: str, prefixes: tuple[str, ...]) -> str:
    """``transformer.layers.0...`` / ``lora_unet__layers_0_...`` -> the bare module path."""
    changed = True
    while changed:
        changed = False
        for p in (*prefixes, *KOHYA_PREFIXES):
            if key.startswith(p):
                key, changed = key[len(p):].lstrip("_"), True
    return key


def read(spec: LoraSpec | str, prefixes: tuple[str, ...] = (), *, allow_pickle: bool = False) -> LoraFile:
    """Read a LoRA file (safetensors; a pickle only with ``allow_pickle``) and sort its tensors
    into pairs by module path. Raises a one-line ZoptError naming the file: missing, corrupt,
    pickle refused, a folder, no LoRA tensors, another adapter type, a half pair."""
    import torch

    from .. import checkpoint
    from .._io import sha256_file

    spec = LoraSpec.parse(spec)
    path = spec.path
    if path.is_dir():
        raise LoraError("is a folder; a LoRA is one .safetensors file", path)
    src = checkpoint.open(path, allow_pickle=allow_pickle)
    if src.kind == "gguf":
        raise LoraError("is a GGUF file; a LoRA is a .safetensors file of lora_A/lora_B (or lora_down/lora_up) "
                        "tensors", path)
    try:
        names = src.names()
        other = next((n for n in names if any(k in n for k in _OTHER_KINDS)), None)
        if other is not None:
            raise LoraError(f"holds {other!r}: only plain low-rank LoRAs (lora_A/lora_B, lora_down/lora_up) are "
                            "supported, not LoKr/LoHa/DoRA or full-weight diffs", path)
        matched = [(n, _KEY.match(n)) for n in names]
        if not any(m for _, m in matched):
            first = ", ".join(repr(n) for n in names[:2]) or "no tensors"
            raise LoraError(f"no LoRA tensors (expected <module>.lora_A/lora_B.weight or lora_down/lora_up.weight; "
                            f"found {first})", path)
        stray = next((n for n, m in matched if m is None), None)
        if stray is not None:
            raise LoraError(f"tensor {stray!r} is not part of a LoRA pair (lora_A/lora_B, lora_down/lora_up, alpha)",
                            path)
        kohya = any(m.group("kind") in ("lora_down", "lora_up") for _, m in matched if m.group("kind"))
        pairs: dict[str, LoraPair] = {}
        for n, m in matched:
            key = strip_module_prefixes(m.group("module"), prefixes)
            pair = pairs.setdefault(key, LoraPair(key))
            t = src.get(n)
            if not torch.is_tensor(t) or not t.is_floating_point():
                raise LoraError(f"tensor {n!r} is not a floating-point tensor", path)
            if m.group("alpha"):
                if t.numel() != 1:
                    raise LoraError(f"alpha {n!r} has {t.numel()} values, not one", path)
                pair.alpha = float(t.reshape(()).item())
            elif t.dim() != 2:
                raise LoraError(f"tensor {n!r} has shape {list(t.shape)}; LoRA matrices are 2-D", path)
            elif m.group("kind") in ("lora_A", "lora_down"):
                pair.down = t.float()
            else:
                pair.up = t.float()
        for key, pair in pairs.items():
            if pair.down is None or pair.up is None:
                raise LoraError(f"module {key!r} has a {'down' if pair.up is None else 'up'} matrix but no "
                                f"{'up' if pair.up is None else 'down'} matrix", path)
            if pair.up.shape[1] != pair.down.shape[0]:
                raise LoraError(f"module {key!r}: up is {list(pair.up.shape)}, down is {list(pair.down.shape)}; "
                                "their ranks differ", path)
            if not (torch.isfinite(pair.down).all() and torch.isfinite(pair.up).all()):
                raise LoraError(f"module {key!r} holds NaN or infinite values", path)
        metadata = dict(getattr(src, "metadata", {}) or {})
    finally:
        src.close()
    return LoraFile(path, sha256_file(path), "kohya" if kohya else "peft", pairs, metadata)
