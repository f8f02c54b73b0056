"""Per-tensor sensitivity from the model's output: its gradient (``--option sensitivity=gradient``,
the default) or a file of transformer calls (``--option calls=FILE``).

The weight-error measurement (:func:`.auto.measure`, ``sensitivity=weights``) predicts a tensor's
cost by its own squared weight error, blind to how large its inputs are and to how an error in it
grows on the way to the output. Here each tensor's cost is its output error instead.

Without a calls file (``gradient``): per call of :func:`random_calls` (seeded random latents,
caption features and timesteps: no calibration run), one forward pass and :data:`GRADIENT_PROBES`
backward passes with random sign vectors on the output estimate every Linear weight's squared
Jacobian norm (Hutchinson's estimator). Over the weight's size that is its *gain*: the output
error an i.i.d. perturbation of its weights adds per unit of their squared size, which scales
every candidate type's weight error.

With a file of transformer calls (``zopt calibrate --save-calls``: the latents, timesteps and
caption features the transformer received while the pipeline generated the calibration prompts),
``--option calls_types=`` says how:

* ``one`` (default): each quantized tensor is replaced by its quantized-then-dequantized copy at its
  cheapest candidate type (quantized as the file will be: the same searches and importance), every
  call is run, and the squared difference from the unquantized model's outputs, summed over the
  calls, is that type's error; that run's output error per unit of squared weight error (the
  tensor's gain) scales the weight errors of its other types (on a sample of rows). This assumes a
  tensor's output error grows in proportion to its weight error (small, noise-like perturbations);
  benchmarks/calls_gain.py compares it with ``all``.
* ``all``: the calls run for every candidate type of every tensor (5-9 times the runs).
* ``gradient``: the gains from the gradient, as above, on these calls.

:func:`.auto.choose` then spends the budget on these errors as it does on weight errors (it adds
them up: a tensor's errors are measured with every other tensor exact).

Cost: one pass over the calls per quantized tensor (``one``; on the medium synthetic model with 2
calls, minutes a file), per tensor and type (``all``; there 46 minutes a file) or
``1 + GRADIENT_PROBES`` per call (``gradient``), and the model in memory (float32 where it fits in
half the available RAM, else bfloat16).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...errors import ZoptError

CALLS_FORMAT = "zopt-transformer-calls/1"
MEASURED_TYPES = ("one", "all", "gradient")  # --option calls_types=
GRADIENT_PROBES = 4  # random output directions per call whose backward passes estimate the gains
GRADIENT_SEED = 0x6A1
# seeded random inputs of the gradient measurement without calls (sensitivity=gradient): latents of
# RANDOM_SIDE x RANDOM_SIDE (256 image tokens), RANDOM_CAPTION caption tokens, RANDOM_TIMESTEPS timesteps
RANDOM_INPUTS, RANDOM_TIMESTEPS, RANDOM_SIDE, RANDOM_CAPTION, RANDOM_SEED = 2, 2, 32, 32, 0
# the probes of the sources being converted: the targets of a multi-target pass share one model in
# memory (and the threads load it once: a concurrent first import of diffusers' model class fails)
_PROBES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_PROBES_LOCK = threading.Lock()


@dataclass
class Calls:
    """Transformer calls: per call, the latent list, the timestep tensor and the caption feature list."""

    items: list[tuple[list[Any], Any, list[Any]]]
    description: str
    path: Path | None = None
    sha256: str = ""


def save_calls(items: list[tuple[list[Any], Any, list[Any]]], path: str | os.PathLike, description: str) -> Path:
    """Write transformer calls (see :class:`Calls`) as safetensors: ``call.{i}.x.{j}``, ``call.{i}.t``,
    ``call.{i}.cap.{j}``, float32 on the CPU, with the format, count and description in the metadata."""
    import torch
    from safetensors.torch import save_file

    tensors = {}
    for i, (xs, t, caps) in enumerate(items):
        for j, x in enumerate(xs):
            tensors[f"call.{i}.x.{j}"] = x.detach().float().cpu().clone()
        tensors[f"call.{i}.t"] = torch.as_tensor(t).detach().float().cpu().reshape(-1).clone()
        for j, c in enumerate(caps):  # (calls of one prompt share its caption features: each call its copy)
            tensors[f"call.{i}.cap.{j}"] = c.detach().float().cpu().clone()
    path = Path(path)
    meta = {"format": CALLS_FORMAT, "calls": str(len(items)), "description": description}
    tmp = path.with_name(path.name + ".partial")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(tmp), metadata=meta)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # as other outputs are made (the writer makes its file private)
        os.replace(tmp, path)
    except OSError as e:
        raise ZoptError(f"cannot write the calls file ({e.strerror or e.__class__.__name__})", path) from None
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_calls(path: str | os.PathLike, config: dict[str, Any] | None = None) -> Calls:
    """The calls of a :func:`save_calls` file, checked against the model's ``config`` (latent channels,
    caption feature width); ZoptError naming the file for anything else."""
    from safetensors import safe_open

    p = Path(path)
    if p.is_dir():
        raise ZoptError("is a folder; name the calls file (zopt calibrate --save-calls writes one)", p)
    if not p.is_file():
        raise ZoptError("no such calls file (zopt calibrate --save-calls writes one)", p)
    with open(p, "rb") as fh:
        if fh.read(4) == b"GGUF":
            raise ZoptError("a GGUF file, not a calls file (an importance matrix goes to --imatrix)", p)
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != CALLS_FORMAT:
                raise ZoptError(f"not a transformer calls file (format {meta.get('format')!r}, expected {CALLS_FORMAT})", p)
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except ZoptError:
        raise
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise ZoptError(f"cannot read calls file ({e.__class__.__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})",
                        p) from None
    try:
        n = int(meta.get("calls", ""))
    except ValueError:
        raise ZoptError("calls file without a call count", p) from None
    items = []
    for i in range(n):
        xs = _listed(tensors, f"call.{i}.x.")
        caps = _listed(tensors, f"call.{i}.cap.")
        t = tensors.get(f"call.{i}.t")
        if not xs or not caps or t is None:
            raise ZoptError(f"call {i} is incomplete (latents, timestep and caption features are needed)", p)
        if len(caps) != len(xs) or t.numel() not in (1, len(xs)):
            raise ZoptError(f"call {i}: {len(xs)} latents, {len(caps)} captions and {t.numel()} timesteps "
                            "(one of each per image)", p)
        if not all(bool(v.isfinite().all()) for v in (*xs, t, *caps)):
            raise ZoptError(f"call {i} holds values that are not finite numbers", p)
        if config is not None:
            patch = int((config.get("all_patch_size") or [2])[0])
            for x in xs:
                if x.dim() != 4 or x.shape[0] != config.get("in_channels") or x.shape[2] % patch or x.shape[3] % patch:
                    raise ZoptError(f"call {i}: latents of shape {tuple(x.shape)} do not fit this model "
                                    f"({config.get('in_channels')} channels, (C, F, H, W), H and W multiples of "
                                    f"{patch})", p)
            for c in caps:
                if c.dim() != 2 or c.shape[0] < 1 or c.shape[1] != config.get("cap_feat_dim"):
                    raise ZoptError(f"call {i}: caption features of shape {tuple(c.shape)} do not fit this model "
                                    f"(at least one token of {config.get('cap_feat_dim')} features)", p)
        items.append((xs, t, caps))
    if not items:
        raise ZoptError("calls file holds no calls", p)
    h = hashlib.sha256()
    with open(p, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return Calls(items, meta.get("description", ""), p, h.hexdigest())


def random_calls(config: dict[str, Any], inputs: int = RANDOM_INPUTS, timesteps: int = RANDOM_TIMESTEPS,
                 side: int = RANDOM_SIDE, seed: int = RANDOM_SEED) -> Calls:
    """Seeded random transformer calls for ``config``: ``inputs`` N(0, 1) latents (``side`` x ``side``)
    with :data:`RANDOM_CAPTION` tokens of N(0, 1) caption features, each at ``timesteps`` timesteps
    spread over (0, 1). The gradient measurement without a calls file runs them with the defaults;
    ``zopt calibrate --inputs random`` with its own counts, size and seed."""
    import torch

    g = torch.Generator().manual_seed(seed)
    items = []
    for _ in range(inputs):
        x = [torch.randn(config["in_channels"], 1, side, side, generator=g)]
        cap = [torch.randn(RANDOM_CAPTION, config["cap_feat_dim"], generator=g)]
        for s in range(timesteps):
            items.append((x, torch.tensor([(s + 0.5) / timesteps]), cap))
    return Calls(items, f"random: {inputs} inputs, {timesteps} timesteps, {side}x{side} latents, "
                        f"{RANDOM_CAPTION} caption tokens, seed {seed}")


def _listed(tensors: dict[str, Any], prefix: str) -> list[Any]:
    out = []
    while f"{prefix}{len(out)}" in tensors:
        out.append(tensors[f"{prefix}{len(out)}"])
    return out


def _model_dtype(params: int, types: str, optional: bool = False):
    """float32 where the model takes at most half the available RAM, else bfloat16 (at most 70%);
    where neither fits, None (``optional``) or ZoptError."""
    from ...platform.hardware import whole_model_dtype

    dtype, avail = whole_model_dtype(params)
    if dtype is None and not optional:
        what = "the gradient gains (sensitivity=gradient)" if types == "gradient" else "measuring sensitivity on the output"
        raise ZoptError(f"{what} need the model in memory: {params * 2 / 1e9:.1f} GB in bfloat16, "
                        f"{avail / 1e9:.1f} GB available; --option sensitivity=weights (without --option calls=) "
                        "measures without the model")
    return dtype


def _outer_norm2(g, x) -> float:
    """``||g^T x||_F^2`` for ``g`` (tokens, out) and ``x`` (tokens, in), in float32: through the tokens'
    Gram matrices, ``sum((g g^T) * (x x^T))``, where there are fewer tokens than ``out * in / (out + in)``
    (then the cheaper product), else through ``g^T x``."""
    g, x = g.float(), x.float()
    n, o, i = g.shape[0], g.shape[1], x.shape[1]
    if n * (o + i) < o * i:
        return float(((g @ g.T) * (x @ x.T)).double().sum())
    return float((g.T @ x).double().square().sum())


class OutputProbe:
    """A source's transformer in memory, the calls and its own outputs on them (the reference)."""

    def __init__(self, model, calls: Calls, types: str = "one", progress: bool = False):
        import torch

        if types not in MEASURED_TYPES:
            raise ZoptError(f"calls_types={types!r}: expected one of {', '.join(MEASURED_TYPES)}")
        self.model = model
        self.calls = calls
        self.types = types
        self.runs = 0  # passes over the calls made by error()
        self._lock = threading.Lock()  # error() swaps a tensor in and out: one measurement at a time
        self.dtype = next(model.parameters()).dtype
        self.device = next(model.parameters()).device
        self.jacobian: dict[str, float] = {}
        self.unreached: list[str] = []
        self.median_gain = 1.0
        if types == "gradient":
            self.jacobian = self._jacobian(progress)
            self.model = None  # the gains are all it needs: the model's memory goes back before the conversion
            return
        with torch.inference_mode():
            self.refs = [self._run(c) for c in calls.items]
        if not all(bool(r.isfinite().all()) for r in self.refs):
            raise ZoptError("the model's outputs on these calls are not all finite numbers", calls.path)

    def _jacobian(self, progress: bool = False) -> dict[str, float]:
        """Per Linear weight (model name), the squared Frobenius norm of the Jacobian of the outputs on
        the calls with respect to it, summed over the calls: ``E_v ||d(v . y)/dW||^2`` over
        :data:`GRADIENT_PROBES` seeded random sign vectors ``v``, each one backward pass. For a Linear
        ``d(v . y)/dW = g^T x`` (``g`` the gradient at its output, ``x`` its input, over the tokens),
        formed in a hook and reduced at once: no weight gradient is kept."""
        import torch

        from ...progress import progress_bar

        sums: dict[str, float] = {}
        handles = []

        def hook_for(name: str):
            def hook(module, inputs, output):
                if not output.requires_grad:
                    return
                x = inputs[0].detach()

                def on_grad(g):
                    sums[name] = sums.get(name, 0.0) + _outer_norm2(g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1]))

                output.register_hook(on_grad)

            return hook

        for n, m in self.model.named_modules():
            if isinstance(m, torch.nn.Linear):
                handles.append(m.register_forward_hook(hook_for(n + ".weight")))
        grads = [p.requires_grad for p in self.model.parameters()]
        g = torch.Generator().manual_seed(GRADIENT_SEED)
        try:
            self.model.requires_grad_(False)
            with torch.enable_grad(), progress_bar(len(self.calls.items), "output gains from the model's gradient",
                                                   unit="calls", enabled=progress) as bar:
                for xs, t, caps in self.calls.items:
                    leaves = [v.detach().to(self.device, self.dtype).requires_grad_(True) for v in (*xs, t, *caps)]
                    y = self._run((leaves[: len(xs)], leaves[len(xs)], leaves[len(xs) + 1:]))
                    if not bool(y.isfinite().all()):
                        raise ZoptError("the model's outputs on these calls are not all finite numbers", self.calls.path)
                    for k in range(GRADIENT_PROBES):
                        v = torch.randint(0, 2, y.shape, generator=g).float().mul_(2).sub_(1).to(y.device)
                        torch.autograd.grad(y, leaves, v, retain_graph=k < GRADIENT_PROBES - 1, allow_unused=True)
                    del y, leaves
                    bar.advance(1)
        finally:
            for h in handles:
                h.remove()
            for p, r in zip(self.model.parameters(), grads, strict=True):
                p.requires_grad_(r)
        out = {k: v / GRADIENT_PROBES for k, v in sums.items()}
        if not all(math.isfinite(v) for v in out.values()):
            raise ZoptError("the model's gradients on these calls are not all finite numbers", self.calls.path)
        # Linears the calls do not reach (Z-Image-Omni's siglip path without image features) take the
        # median gain of those they do: neither free nor favoured
        numel = {n + ".weight": m.weight.numel() for n, m in self.model.named_modules() if isinstance(m, torch.nn.Linear)}
        self.unreached = sorted(n for n in numel if n not in out)
        per_weight = sorted(v / numel[k] for k, v in out.items() if k in numel)
        self.median_gain = per_weight[len(per_weight) // 2] if per_weight else 1.0
        return out

    def gain(self, name: str, numel: int) -> float:
        """Tensor ``name``'s (original layout) output error per unit of squared weight error, from the
        Jacobian (``gradient``): its squared norm over the tensor's weights, i.e. the output error an
        i.i.d. perturbation of each weight adds, per unit of its variance."""
        targets = self._targets(name)
        if any(t not in self.jacobian for t in targets):  # not on the calls' path: the median gain
            return self.median_gain
        return sum(self.jacobian[t] for t in targets) / numel

    @classmethod
    def from_source(cls, src, calls_path: str | os.PathLike | None, types: str = "one",
                    progress: bool = False, optional: bool = False) -> OutputProbe | None:
        """The probe of ``src`` (the source itself where ``src`` is one target's share of a
        multi-target pass: its targets share the probe) on the calls of ``calls_path`` (None:
        :func:`random_calls`, for ``gradient``). Where the model does not fit in memory: None
        (``optional``; decided once per source and calls, so the targets of a pass agree) or ZoptError."""
        from ...families import zimage
        from ..plain import load_source

        src = getattr(src, "direct", None) or src
        key = (str(Path(calls_path).resolve()) if calls_path is not None else None, types)
        with _PROBES_LOCK:
            try:
                shared = _PROBES.setdefault(src, {})
            except TypeError:  # a source that cannot be weakly referenced: not shared
                shared = {}
            if key in shared:  # None: the model did not fit (optional)
                return shared[key]
            config = zimage.check_shapes(src)
            calls = read_calls(calls_path, config) if calls_path is not None else random_calls(config)
            params = sum(math.prod(src.info(n).shape) for n in src.names())
            dtype = _model_dtype(params, types, optional)
            shared[key] = None if dtype is None else cls(load_source(src, dtype=dtype).eval(), calls, types, progress)
            return shared[key]

    def _run(self, call):
        import torch

        xs, t, caps = call
        d, dt = self.device, self.dtype
        out = self.model([x.to(d, dt) for x in xs], t.to(d, dt), [c.to(d, dt) for c in caps], return_dict=False)[0]
        return torch.cat([o.float().flatten() for o in out]) if isinstance(out, (list, tuple)) else out.float().flatten()

    def _targets(self, name: str) -> list[str]:
        """The model parameters an original-layout weight name stands for (the fused qkv: q, k, v)."""
        from ...families import zimage

        d = zimage.to_diffusers_name(name)
        if name.endswith(".attention.qkv.weight"):
            stem = d[: -len("qkv.weight")]
            return [f"{stem}{part}.weight" for part in ("to_q", "to_k", "to_v")]
        return [d]

    def weight(self, name: str):
        """The tensor ``name`` (original layout) as the model holds it."""
        import torch

        params = [self.model.get_parameter(t) for t in self._targets(name)]
        return torch.cat([p.detach() for p in params]) if len(params) > 1 else params[0].detach()

    def _put(self, name: str, w) -> None:
        targets = self._targets(name)
        parts = w.chunk(len(targets)) if len(targets) > 1 else [w]
        for t, part in zip(targets, parts, strict=True):
            p = self.model.get_parameter(t)
            p.data.copy_(part.reshape(p.shape).to(p.dtype))

    def error(self, name: str, w) -> float:
        """Summed squared output difference over the calls with tensor ``name`` replaced by ``w``."""
        import torch

        with self._lock:
            original = self.weight(name).clone()
            try:
                self._put(name, w)
                with torch.inference_mode():
                    e = sum(float((self._run(c) - r).double().square().sum())
                            for c, r in zip(self.calls.items, self.refs, strict=True))
                self.runs += 1
            finally:
                self._put(name, original)
        if not math.isfinite(e):
            raise ZoptError(f"measuring {name} on the calls gave a non-finite output error", self.calls.path)
        return e

    def measure(self, plan, w, importance, types, threads: int):
        """:class:`.auto.Sensitivity` of ``plan``'s tensor ``w`` (read from the source) on ``types``,
        each quantized as the file will be (:func:`.auto.roundtrip`, on the caller's thread count:
        one, the searches being many small operations), the calls run on ``threads``: for every
        type (``all``), or for the cheapest only (``one``), the others' errors being its output
        error times their weight errors over its own (:func:`.auto.measure`'s, on the same sample
        of rows as the default measurement)."""

        from .auto import Sensitivity, measure, roundtrip
        from .recipes import tensor_nbytes

        x = w.float().reshape(-1, w.shape[-1])
        nbytes = {t: tensor_nbytes(plan.shape, t) for t in types}
        if self.types == "gradient":
            g = self.gain(plan.name, x.numel())
            weight = measure(plan.name, x, importance, types, weigh=False).errors
            return Sensitivity(plan.name, {t: g * weight[t] for t in types}, nbytes)
        if self.types == "all":
            errors = {t: self._output_error(plan, roundtrip(x, t, importance), threads) for t in types}
            return Sensitivity(plan.name, errors, nbytes)
        m = min(types, key=lambda t: (nbytes[t], types.index(t)))
        weight = measure(plan.name, x, importance, types, weigh=False).errors
        out = self._output_error(plan, roundtrip(x, m, importance), threads)
        gain = out / weight[m] if weight[m] > 0 else 0.0
        return Sensitivity(plan.name, {t: out if t == m else gain * weight[t] for t in types}, nbytes)

    def _output_error(self, plan, deq, threads: int) -> float:
        import torch

        one = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return self.error(plan.name, deq.reshape(plan.shape))
        finally:
            torch.set_num_threads(one)

    def header(self) -> dict[str, str]:
        """What the GGUF header records of the calls."""
        c = self.calls
        d = {"calls": len(c.items), "description": c.description, "measured_types": self.types}
        if self.types == "gradient":  # the model's dtype in the pass, and the Linears the calls did not reach
            d.update(dtype=str(self.dtype).removeprefix("torch."), unreached=len(self.unreached))
        described = {"zopt.sensitivity.calls.description": json.dumps(d)}
        if c.path is None:  # the seeded random calls: the description says what they were
            return described
        return {"zopt.sensitivity.calls.file": c.path.name, "zopt.sensitivity.calls.sha256": c.sha256, **described}
