"""``gguf:auto``: one GGML type per tensor, chosen to minimize predicted output error within a size.

Sensitivity is measured, per tensor and candidate type, on a sample of the tensor's rows: the
squared reconstruction error ``sum_ij (W - Q(W))_ij^2`` scaled to the whole tensor, the candidates
quantized with the importance matrix's weighted searches when one is given. Weighing the errors by
``E[x_j^2]`` (the error added to the layer's output) chose a worse mix on the medium model, see
docs/quality-per-bit.md; :func:`measure` still offers it (``weigh``) for the benchmark's
``--predict``.

The choice is a knapsack on that prediction: every quantized tensor starts at its cheapest
candidate, then the upgrade with the largest error reduction per added byte (on each tensor's
lower convex hull of (bytes, error)) is taken while it fits the budget; upgrades that do not fit
are skipped, smaller ones still taken. Tensors the policy keeps stay as the recipes keep them.
Tensors whose family rule sets ``auto_least`` (Z-Image: patch embedding, final layer, timestep
MLP) only take types at least that precise: the proxy misses that their errors reach the output
undiluted (measured, see ``zimage.sensitive``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from ...errors import ZoptError
from ...families import zimage
from .recipes import FLOAT_TYPES, PRECISION_ORDER, TensorPlan, row_type, tensor_nbytes

K_CANDIDATES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0", "BF16")
LEGACY_CANDIDATES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "BF16")
SAMPLE_WEIGHTS = 1 << 17  # weights per tensor quantized to measure its sensitivity
HEADER_SLACK = 256  # bytes of header beyond what is counted per tensor and key


@dataclass(frozen=True)
class Sensitivity:
    """Predicted error (importance-weighted squared error, whole tensor) and bytes per candidate type."""

    name: str
    errors: dict[str, float]
    nbytes: dict[str, int]


# A family floor (``auto_least``) is cheap insurance where the tensor is a small part of the model
# (the full model's embedders and final layer: under 0.1%); in a test-sized model whose timestep
# MLP is a third of the weights it would take the bits from everything else (measured on the
# micro model: 5.84 bits per weight before any other tensor could be quantized)
FLOOR_SHARE = 0.01


def candidates(shape: tuple[int, ...], name: str | None = None, share: float = 0.0) -> tuple[str, ...]:
    """Types a quantized tensor of ``shape`` may take (K types need rows of 256, legacy of 32);
    with ``name``, only those at least as precise as the family's ``auto_least`` for it, where the
    tensor holds at most :data:`FLOOR_SHARE` of the model's parameters (``share``)."""
    cols = shape[-1]
    types = K_CANDIDATES if cols % 256 == 0 else LEGACY_CANDIDATES if cols % 32 == 0 else ("BF16",)
    rule = zimage.sensitive_reason(name) if name is not None else None
    if rule is not None and rule.auto_least is not None and share <= FLOOR_SHARE:
        types = tuple(t for t in types if PRECISION_ORDER.index(t) >= PRECISION_ORDER.index(rule.auto_least))
    return types


def parse_size(text: str) -> int:
    """``"5GB"``, ``"800MB"``, ``"1.5GiB"``, ``"123456"`` -> bytes; ZoptError otherwise."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(I?B?)\s*", str(text).upper())
    if not m:
        raise ZoptError(f"target size {text!r} is not a size such as 5GB or 800MB")
    unit = 1024 if m.group(3).startswith("I") else 1000
    return int(float(m.group(1)) * unit ** "_KMGT".index(m.group(2) or "_"))


def roundtrip(x, qtype: str, importance=None):
    """Float rows ``x`` as a file of type ``qtype`` holds them: quantized and dequantized (``importance``
    per column for the weighted searches; None: ggml's reference quantizer), or cast for a float type."""
    import torch

    from . import quants

    if qtype in FLOAT_TYPES:
        return x if qtype == "F32" else x.to(torch.bfloat16 if qtype == "BF16" else torch.float16).float()
    return quants.dequantize(quants.quantize(x, qtype, importance), qtype, tuple(x.shape))


def measure(name: str, w, importance=None, types: tuple[str, ...] | None = None,
            weigh: bool = True) -> Sensitivity:
    """Sensitivity of tensor ``name`` (float tensor ``w``, rows x cols) to each candidate type, from
    up to :data:`SAMPLE_WEIGHTS` weights of evenly spaced rows; ``importance`` (cols,) per column
    drives the weighted searches and (``weigh``) weighs the errors."""
    import torch

    w2 = w.reshape(-1, w.shape[-1])
    rows, cols = w2.shape
    n = min(rows, max(4, SAMPLE_WEIGHTS // cols))
    idx = torch.linspace(0, rows - 1, n).round().long().unique()
    x = w2[idx].float()
    imp = torch.ones(cols) if importance is None else torch.as_tensor(importance, dtype=torch.float32)
    scale = rows / idx.numel()
    errors, nbytes = {}, {}
    for t in types or candidates(tuple(w.shape)):
        deq = roundtrip(x, t, None if importance is None else imp)
        errors[t] = float(((x - deq).square() * (imp if weigh else 1.0)).sum()) * scale
        nbytes[t] = tensor_nbytes(tuple(w.shape), t)
    return Sensitivity(name, errors, nbytes)


def _hull(s: Sensitivity) -> list[str]:
    """Types on the lower convex hull of (bytes, error), cheapest first (dominated ones dropped)."""
    pts = sorted(s.nbytes, key=lambda t: (s.nbytes[t], s.errors[t]))
    hull: list[str] = []
    for t in pts:
        if hull and s.errors[t] >= s.errors[hull[-1]]:
            continue  # costs more, no better
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # drop b when a -> t improves error per byte at least as fast as a -> b
            slope_ab = (s.errors[a] - s.errors[b]) / max(1, s.nbytes[b] - s.nbytes[a])
            slope_at = (s.errors[a] - s.errors[t]) / max(1, s.nbytes[t] - s.nbytes[a])
            if slope_at >= slope_ab:
                hull.pop()
            else:
                break
        hull.append(t)
    return hull


def choose(sens: list[Sensitivity], budget: int) -> dict[str, str]:
    """Type per tensor minimizing the summed predicted error with total bytes <= ``budget``;
    ZoptError when even the cheapest types do not fit."""
    hulls = {s.name: _hull(s) for s in sens}
    by = {s.name: s for s in sens}
    pick = {n: 0 for n in hulls}
    used = sum(by[n].nbytes[h[0]] for n, h in hulls.items())
    if used > budget:
        raise ZoptError(f"target too small: the cheapest types need {used / 1e6:.2f} MB of quantized tensors, "
                        f"the budget leaves {budget / 1e6:.2f} MB")
    while True:
        best, best_gain = None, 0.0
        for n, h in hulls.items():
            i = pick[n]
            if i + 1 >= len(h):
                continue
            s, a, b = by[n], h[i], h[i + 1]
            extra = s.nbytes[b] - s.nbytes[a]
            if used + extra > budget:
                continue
            gain = (s.errors[a] - s.errors[b]) / max(1, extra)
            if best is None or gain > best_gain:
                best, best_gain = n, gain
        if best is None:
            break
        h, i = hulls[best], pick[best]
        used += by[best].nbytes[h[i + 1]] - by[best].nbytes[h[i]]
        pick[best] = i + 1
    return {n: hulls[n][i] for n, i in pick.items()}


def plan_auto(view, base: list[TensorPlan], *, target_bpw: float | None, target_size: str | None,
              imatrix=None, metadata_bytes: int = 0, unit: bool = True, progress: bool = False,
              probe=None) -> tuple[list[TensorPlan], dict[str, Sensitivity]]:
    """Plans with auto-chosen types for the tensors ``base`` quantizes (``base``: a recipe's plan,
    whose float tensors stay as they are), and the measured sensitivities. Reads each quantized
    tensor once (streaming). The budget is the whole file: ``target_bpw`` bits per parameter or
    ``target_size``, less the header (``metadata_bytes`` for the key/values) and the float tensors.
    ``unit``: measure with unit importance where the imatrix has no entry (``search=weighted``).
    ``probe``: an :class:`.outputs.OutputProbe` to measure on the model's output instead."""
    if (target_bpw is None) == (target_size is None):
        raise ZoptError("gguf:auto needs exactly one of --target-bpw and --target-size")
    params = sum(math.prod(p.shape) for p in base)
    if target_bpw is not None:
        if not 1.0 <= target_bpw <= 32.0:
            raise ZoptError(f"--target-bpw {target_bpw} is outside 1..32")
        total = int(target_bpw * params / 8)
    else:
        total = parse_size(target_size)
    fixed = sum(tensor_nbytes(p.shape, p.qtype) for p in base if p.qtype in FLOAT_TYPES)
    # a tensor's header entry: name, dims, type, offset; its data is padded to 32 bytes (16 on average)
    header = metadata_bytes + HEADER_SLACK + sum(len(p.name) + 40 + 8 * len(p.shape) for p in base)
    quantized = [p for p in base if p.qtype not in FLOAT_TYPES]
    if not quantized:
        raise ZoptError("gguf:auto has nothing to choose: the policy keeps every tensor of this model in float "
                        "(--quantize PATTERN forces Linears to be quantized)")
    budget = total - fixed - header
    sens = _sensitivities(view, quantized, imatrix,
                          lambda p: candidates(p.shape, p.name, math.prod(p.shape) / params), unit, progress, probe)
    try:
        types = choose(list(sens.values()), budget)
    except ZoptError:
        least = total - budget + sum(min(s.nbytes.values()) for s in sens.values())
        raise ZoptError(f"target too small: {total / 1e6:.3f} MB, but the tensors kept in float and the "
                        f"cheapest types need {least / 1e6:.3f} MB ({8 * least / params:.2f} bits/weight)") from None
    out = []
    for p in base:
        if p.name in types:
            t = types[p.name]
            s = sens[p.name]
            out.append(TensorPlan(p.name, p.shape, t, f"auto: predicted error {s.errors[t]:.4g} "
                                  f"({', '.join(f'{k} {v:.3g}' for k, v in s.errors.items())})"))
        else:
            out.append(p)
    return out, sens


def _sensitivities(view, plans: list[TensorPlan], imatrix, types_for, unit: bool = True,
                   progress: bool = False, probe=None) -> dict[str, Sensitivity]:
    """:func:`measure` for every plan, on candidate types ``types_for(plan)``, quantized as the file
    will be: the imatrix's weighted searches, or with ``unit`` importance where it has no entry
    (``search=weighted``), else ggml's reference quantizers; each tensor read once (streaming).
    The importance matrix shapes the searches, not the allocation: measured on the medium model,
    errors weighted by ``E[x^2]`` chose a worse mix (docs/quality-per-bit.md). With ``probe`` (an
    :class:`.outputs.OutputProbe`) each error is the model's output error instead."""
    import torch

    from ...progress import progress_bar

    sens: dict[str, Sensitivity] = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the searches are thousands of small ops: one thread is fastest (docs/ggml-quants.md)
    label = "measuring sensitivity" + ("" if probe is None else " x gradient gains" if probe.types == "gradient"
                                       else f" on the output ({len(probe.calls.items)} calls)")
    try:
        with progress_bar(len(plans), label, unit="tensors", enabled=progress) as bar:
            for p in plans:
                with torch.inference_mode():
                    w = view.get(p.name).reshape(p.shape)
                    imp = imatrix.importance(p.name, p.shape[-1]) if imatrix is not None else None
                    if imp is None and unit:
                        imp = torch.ones(p.shape[-1])
                    sens[p.name] = (measure(p.name, w, imp, types_for(p), weigh=False) if probe is None
                                    else probe.measure(p, w, imp, types_for(p), threads))
                    del w
                bar.advance(1)
    finally:
        torch.set_num_threads(threads)
    return sens


def retune(view, rule: list[TensorPlan], base: str, *, imatrix=None, reserve: int = 0, unit: bool = True,
           progress: bool = False, probe=None) -> tuple[list[TensorPlan], dict[str, Sensitivity]]:
    """A named recipe (Q4_K_M, Q3_K_S, Q4_0, ...: ``Recipe.measured``) re-tuned by the measurement
    ``gguf:auto`` makes.

    ``rule``: the recipe's plan by its rules. The bytes it gives its quantized tensors (the Q8_0
    adaLN included), less ``reserve`` (the recorded type map), are spent by :func:`choose` on the
    same per-tensor sensitivity, every one of those tensors at least the recipe's ``base`` type (or
    its row fallback; a 32-block recipe among the 32-block types) and at most BF16; float tensors
    stay as the rule stores them. The file is no larger than the rule's. Where the prediction does
    not favour the choice, the rule's plan is returned as it is."""
    movable = [p for p in rule if p.qtype not in FLOAT_TYPES]
    if not movable:
        return rule, {}

    def types_for(p: TensorPlan) -> tuple[str, ...]:
        floor = PRECISION_ORDER.index(row_type(base, p.shape[-1]))
        # a 32-block recipe stays in its family (K types are not what its name promises)
        own = LEGACY_CANDIDATES if base in LEGACY_CANDIDATES and p.shape[-1] % 32 == 0 else candidates(p.shape)
        return tuple(t for t in dict.fromkeys((*own, p.qtype)) if PRECISION_ORDER.index(t) >= floor or t == p.qtype)

    sens = _sensitivities(view, movable, imatrix, types_for, unit, progress, probe)
    budget = sum(p.nbytes for p in movable) - reserve
    try:
        types = choose(list(sens.values()), budget)
    except ZoptError:
        return rule, sens
    by_rule = sum(sens[p.name].errors[p.qtype] for p in movable)
    chosen = sum(sens[n].errors[t] for n, t in types.items())
    if chosen >= by_rule:
        return rule, sens
    out = []
    for p in rule:
        t = types.get(p.name)
        if t is None:
            out.append(p)
        elif t == p.qtype:
            out.append(TensorPlan(p.name, p.shape, t, f"{p.reason}; kept by measurement"))
        else:
            out.append(TensorPlan(p.name, p.shape, t, f"measured: {t} buys more per byte than the rule's {p.qtype} "
                                  f"(predicted error {sens[p.name].errors[p.qtype]:.4g} -> {sens[p.name].errors[t]:.4g})"))
    return out, sens
