"""The one keep/quantize decision for every tensor, used by every format.

For one tensor (first rule that applies wins):

1. a tensor that is not a Linear weight (not a 2-D ``*.weight``: norms, biases, pad tokens) is kept;
2. a ``--keep`` pattern keeps it;
3. a ``--quantize`` pattern quantizes it, overriding rule 4;
4. the family's precision-sensitive rules (``zimage.SENSITIVE``) keep it;
5. a shape the format cannot (or need not) store quantized is kept (the format says which);
6. everything else is quantized.

Patterns are regular expressions searched in every name a tensor goes by: its diffusers name, its
original/ComfyUI name, and for q, k and v the fused ``attention.qkv`` name they are stored under in
the original layout. So ``--keep attention\\.out`` and ``--keep attention\\.to_out`` mean the same
thing in every format, whichever key layout the format writes. A fused ``attention.qkv`` tensor is
quantized only if all three of its parts are.

The policy decides *whether* a tensor is quantized and the least precision a kept tensor needs
(``floor``); each format then chooses the storage type (a GGUF recipe's block type, FP8 E4M3...).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from .errors import ZoptError
from .families import zimage

_QKV = ".attention.qkv.weight"
_PARTS = ("to_q", "to_k", "to_v")


@dataclass(frozen=True)
class Decision:
    """What happens to one tensor."""

    quantize: bool
    reason: str
    floor: str | None = None  # "F32" / "BF16": the least precision the family's rules ask for, if any
    forced: bool = False  # quantized because a --quantize pattern asked for it
    sensitive: bool = False  # kept because of the family's precision rules (not --keep, not its shape)
    unsupported: bool = False  # kept because the format cannot (or need not) store this shape quantized


def compile_patterns(patterns: str | Iterable[str] | None) -> list[re.Pattern]:
    """Regexes from ``--keep`` / ``--quantize`` values; a bad one is a one-line ZoptError."""
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


def names_of(name: str) -> tuple[str, ...]:
    """Every name tensor ``name`` (either layout) goes by: diffusers, original, fused qkv."""
    d = zimage.to_diffusers_name(name)
    out = [d, zimage.to_original_name(d)]
    m = re.search(r"\.attention\.(to_q|to_k|to_v)\.weight$", d)
    if m:
        out.append(zimage.to_original_name(d[: m.start()]) + _QKV)
    return tuple(dict.fromkeys(out))


def diffusers_parts(name: str) -> list[str]:
    """The diffusers tensors an original-layout tensor holds (three for a fused qkv, else one)."""
    d = zimage.to_diffusers_name(name)
    if d.endswith(_QKV):
        base = d[: -len("qkv.weight")]
        return [f"{base}{p}.weight" for p in _PARTS]
    return [d]


def is_linear_weight(name: str, shape: tuple[int, ...]) -> bool:
    """A Linear layer's weight: a 2-D ``*.weight`` (the family's norms are 1-D, pad tokens not ``.weight``)."""
    return len(shape) == 2 and zimage.to_diffusers_name(name).endswith(".weight")


class Policy:
    """Per-tensor decisions for one conversion (see the module docstring for the rules).

    ``unsupported(shape)`` is the format's say: a reason to keep a tensor of that shape, or None.
    """

    def __init__(self, keep: str | Iterable[str] | None = (), quantize: str | Iterable[str] | None = (),
                 unsupported: Callable[[tuple[int, ...]], str | None] | None = None):
        self.keep = compile_patterns(keep)
        self.force = compile_patterns(quantize)
        self.unsupported = unsupported or (lambda shape: None)

    @classmethod
    def from_options(cls, options, unsupported: Callable[[tuple[int, ...]], str | None] | None = None) -> Policy:
        """The policy of a format's typed options (their ``keep`` and ``quantize`` patterns)."""
        return cls(getattr(options, "keep", ()), getattr(options, "quantize", ()), unsupported)

    @staticmethod
    def _match(pats: list[re.Pattern], name: str) -> re.Pattern | None:
        names = names_of(name)
        return next((p for p in pats if any(p.search(n) for n in names)), None)

    @staticmethod
    def floor(name: str) -> str | None:
        """The least precision the family's rules ask for tensor ``name``, if any."""
        rule = zimage.sensitive_reason(name)
        return rule.keep if rule is not None else None

    def _rules(self, name: str, shape: tuple[int, ...]) -> Decision:
        """Rules 1-4 for one diffusers tensor."""
        floor = self.floor(name)
        if not is_linear_weight(name, shape):
            return Decision(False, "not a Linear weight", floor)
        if (p := self._match(self.keep, name)) is not None:
            return Decision(False, f"--keep {p.pattern}", floor)
        forced = self._match(self.force, name)
        rule = zimage.sensitive_reason(name)
        if forced is None and rule is not None:
            return Decision(False, f"sensitive: {rule.reason}", floor, sensitive=True)
        if forced is not None:
            return Decision(True, f"--quantize {forced.pattern}", floor, forced=True)
        return Decision(True, "policy", floor)

    def decide(self, name: str, shape: tuple[int, ...]) -> Decision:
        """The decision for tensor ``name`` (diffusers or original layout) of ``shape``.

        A fused ``attention.qkv`` tensor is decided part by part: quantized only if all three are.
        """
        shape = tuple(shape)
        parts = diffusers_parts(name)
        if len(parts) > 1:
            part_shape = (shape[0] // len(parts), *shape[1:]) if shape else shape
            decs = [self._rules(p, part_shape) for p in parts]
            kept = next((d for d in decs if not d.quantize), None)
            if kept is not None:
                return kept
            dec = decs[0] if all(d.forced for d in decs) else next(d for d in decs if not d.forced)
        else:
            dec = self._rules(parts[0], shape)
            if not dec.quantize:
                return dec
        why = self.unsupported(shape)
        if why:
            return Decision(False, why, dec.floor, unsupported=True)
        return dec


def kept_storage(dec: Decision, src_dtype: str) -> str:
    """Storage of a kept tensor in the diffusers-layout formats: F32 only where the family's rules
    ask for it and the source has it, else BF16."""
    return "F32" if dec.floor == "F32" and src_dtype == "F32" else "BF16"
