"""How a generation samples: presets, classifier-free guidance, the noise schedule, prompt encoding.

The settings mean what they mean in diffusers' ``ZImagePipeline``:

``guidance``           CFG scale ``g``: the prediction is ``pos + g * (pos - neg)``, so 0 turns
                       guidance off (Turbo) and 4 is Base's recommendation. With ``g > 0`` each
                       step runs the transformer on the prompt and on the negative prompt (a batch
                       twice as large).
``cfg_normalization``  0 (off) or a factor ``k``: a guided prediction whose norm exceeds ``k``
                       times the norm of the positive prediction is scaled back to it (1 = the
                       model card's ``True``; on for realism, off for stylized images).
``cfg_truncation``     guidance stops (scale 0, one forward) on the steps whose normalized time
                       ``1 - sigma`` exceeds this value; 1.0 keeps it on every step.
``max_sequence_length`` prompt tokens the text encoder sees (longer prompts are cut); 512.
``shift``              the scheduler's time shift (``sigma' = s*sigma / (1 + (s-1)*sigma)``); None
                       keeps the pipeline's (3.0 for Z-Image).
``sigmas``             a custom, decreasing schedule in (0, 1] before the shift; its length is the
                       step count.

Presets come from the model family (``Family.presets``: ``turbo`` and ``base`` for Z-Image); a
value given explicitly always wins over the preset's. :func:`check` validates values without
importing anything heavy, so commands refuse bad input before loading a model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from ..errors import ZoptError

MAX_SEQUENCE_LENGTH = 512  # diffusers' ZImagePipeline default
SEQUENCE_LIMIT = 8192
DEFAULT_SHIFT = 3.0  # Z-Image's scheduler config (both variants)
FIELDS = ("steps", "guidance", "cfg_normalization", "cfg_truncation", "max_sequence_length", "shift", "sigmas")


class SamplingWarning(UserWarning):
    """A request that runs, but probably not as meant (``zopt generate`` prints it as one line)."""


class TurboGuidanceWarning(SamplingWarning):
    """Guidance > 0 on a checkpoint distilled to run without it."""


class PromptTruncatedWarning(SamplingWarning):
    """A prompt longer than ``max_sequence_length`` tokens: the text encoder reads only its start."""


@dataclass(frozen=True)
class Sampling:
    """Resolved sampling settings (see the module docstring); ``preset`` names where defaults came from."""

    steps: int = 8
    guidance: float = 0.0
    cfg_normalization: float = 0.0
    cfg_truncation: float = 1.0
    max_sequence_length: int = MAX_SEQUENCE_LENGTH
    shift: float | None = None
    sigmas: tuple[float, ...] | None = None
    preset: str | None = None

    @property
    def cfg(self) -> bool:
        return self.guidance > 0

    def as_dict(self) -> dict[str, Any]:
        return {"preset": self.preset, "steps": self.steps, "guidance_scale": self.guidance,
                "cfg_normalization": self.cfg_normalization, "cfg_truncation": self.cfg_truncation,
                "max_sequence_length": self.max_sequence_length, "shift": self.shift,
                "sigmas": list(self.sigmas) if self.sigmas else None}


def _bad(name: str, value: Any, why: str) -> ZoptError:
    return ZoptError(f"--{name.replace('_', '-')} {value!r}: {why}")


def check(**values: Any) -> None:
    """Refuse out-of-range settings (None = not given) with one line naming the option."""
    def number(name: str, lo: float, hi: float = math.inf, lo_open: bool = False) -> None:
        v = values.get(name)
        if v is None:
            return
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise _bad(name, v, "not a finite number")
        if v < lo or (lo_open and v == lo) or v > hi:
            rng = f"({lo}, {hi}]" if lo_open else f"[{lo}, {hi}]"
            raise _bad(name, v, f"must lie in {rng.replace('inf', 'infinity')}")

    unknown = set(values) - set(FIELDS) - {"preset", "negative_prompt"}
    if unknown:
        raise ZoptError(f"unknown sampling setting(s): {', '.join(sorted(unknown))}")
    steps = values.get("steps")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= 1000):
        raise _bad("steps", steps, "must be an integer from 1 to 1000")
    msl = values.get("max_sequence_length")
    if msl is not None and (isinstance(msl, bool) or not isinstance(msl, int) or not 1 <= msl <= SEQUENCE_LIMIT):
        raise _bad("max_sequence_length", msl, f"must be an integer from 1 to {SEQUENCE_LIMIT}")
    number("guidance", 0.0, 100.0)
    number("cfg_normalization", 0.0, 100.0)
    number("cfg_truncation", 0.0, 1.0)
    number("shift", 0.0, 100.0, lo_open=True)
    sig = values.get("sigmas")
    if sig is not None:
        sig = tuple(sig)
        if not sig or not all(isinstance(s, (int, float)) and math.isfinite(s) and 0 < s <= 1 for s in sig):
            raise _bad("sigmas", ",".join(map(str, sig)), "needs numbers in (0, 1]")
        if any(b >= a for a, b in zip(sig, sig[1:])):
            raise _bad("sigmas", ",".join(map(str, sig)), "must decrease strictly")
        if steps is not None and steps != len(sig):
            raise ZoptError(f"--steps {steps} disagrees with the {len(sig)} values of --sigmas (give one of them)")
    neg = values.get("negative_prompt")
    if neg is not None and not isinstance(neg, str):
        raise _bad("negative_prompt", neg, "must be text")


def parse_sigmas(text: str | None) -> tuple[float, ...] | None:
    """``"1,0.75,0.5,0.25"`` -> a checked tuple (None for None)."""
    if text is None:
        return None
    try:
        sig = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise _bad("sigmas", text, "is not a comma-separated list of numbers") from None
    check(sigmas=sig)
    return sig


def resolve(presets: dict[str, dict[str, Any]], preset: str | None = None, variant: str | None = None,
            **explicit: Any) -> Sampling:
    """Settings from ``preset`` (``None``/``"auto"``: the checkpoint's ``variant``, else ``turbo``),
    with every value in ``explicit`` that is not None taking its place."""
    check(**explicit)
    name = variant if preset in (None, "auto") else preset
    if name not in presets:
        if preset not in (None, "auto"):
            raise ZoptError(f"--preset {preset!r}: choose auto or one of {', '.join(presets) or '(none)'}")
        name = "turbo" if "turbo" in presets else None
    base = dict(presets.get(name, {})) if name else {}
    given = {k: v for k, v in explicit.items() if v is not None}
    if given.get("sigmas") is not None:
        given["sigmas"] = tuple(given["sigmas"])
        given.setdefault("steps", len(given["sigmas"]))
    s = replace(Sampling(), **{k: v for k, v in base.items() if k in FIELDS}, preset=name)
    s = replace(s, **given)
    check(**{k: getattr(s, k) for k in FIELDS})
    return s


def turbo_warning(variant: str | None, guidance: float, where: str = "") -> str | None:
    """The one-line warning for guidance > 0 on a Turbo checkpoint (None when it does not apply)."""
    if variant != "turbo" or guidance <= 0:
        return None
    at = f" ({where})" if where else ""
    return (f"guidance {guidance:g} on a Turbo checkpoint{at}: Turbo is distilled to run without guidance "
            "(use --guidance 0, or a Base checkpoint); each step now runs the transformer twice")


def shifted(sigma: float, shift: float) -> float:
    return shift * sigma / (1 + (shift - 1) * sigma)


def schedule(steps: int, shift: float | None = None, sigmas: tuple[float, ...] | None = None) -> list[float]:
    """The sigmas of the steps diffusers' ZImagePipeline runs (installed diffusers >= 0.42:
    ``linspace(1, 1/steps, steps)`` unless given, then shifted)."""
    base = list(sigmas) if sigmas else [1.0 - i * (1.0 - 1.0 / steps) / max(1, steps - 1) for i in range(steps)]
    return [shifted(s, DEFAULT_SHIFT if shift is None else shift) for s in base]


def cfg_steps(s: Sampling) -> int:
    """How many steps run guided (two forwards each): all of them unless ``cfg_truncation`` stops
    guidance on the late steps, none without guidance."""
    if not s.cfg:
        return 0
    if s.cfg_truncation >= 1.0:
        return s.steps
    return sum(1 for sig in schedule(s.steps, s.shift, s.sigmas) if 1.0 - sig <= s.cfg_truncation)


def call_kwargs(s: Sampling) -> dict[str, Any]:
    """Keyword arguments of ``ZImagePipeline.__call__`` for ``s``."""
    return {"num_inference_steps": s.steps, "guidance_scale": s.guidance,
            "cfg_normalization": s.cfg_normalization if s.cfg_normalization > 0 else False,
            "cfg_truncation": s.cfg_truncation, "max_sequence_length": s.max_sequence_length,
            "sigmas": list(s.sigmas) if s.sigmas else None}


def apply_shift(pipe, shift: float | None) -> None:
    """Give ``pipe`` a scheduler with time shift ``shift`` (None: the one it was loaded with)."""
    orig = getattr(pipe, "zopt_scheduler_config", None)
    if orig is None:
        if shift is None:
            return
        orig = pipe.zopt_scheduler_config = dict(pipe.scheduler.config)
    want = orig.get("shift", DEFAULT_SHIFT) if shift is None else float(shift)
    if pipe.scheduler.config.get("shift") != want:
        pipe.scheduler = type(pipe.scheduler).from_config(orig, shift=want)


def encode_texts(pipe, texts: list[str], max_sequence_length: int, batch: int = 1) -> dict[str, Any]:
    """Text -> embedding for every distinct text in ``texts``, encoded ``batch`` at a time with the
    pipeline's own encoder (so all encoding happens before any denoising step)."""
    import warnings

    unique = list(dict.fromkeys(texts))
    for text in unique:  # the pipeline cuts long prompts without a word; say so
        templated = pipe.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                       add_generation_prompt=True, enable_thinking=True)
        n = len(pipe.tokenizer(templated).input_ids)
        if n > max_sequence_length:
            warnings.warn(f"prompt {text[:40]!r}{'...' if len(text) > 40 else ''} is {n} tokens with its chat "
                          f"template; only the first {max_sequence_length} are read (--max-sequence-length)",
                          PromptTruncatedWarning, stacklevel=3)
    out: dict[str, Any] = {}
    device = pipe._execution_device
    for i in range(0, len(unique), max(1, batch)):
        chunk = unique[i : i + max(1, batch)]
        embeds, _ = pipe.encode_prompt(prompt=list(chunk), device=device, do_classifier_free_guidance=False,
                                       max_sequence_length=max_sequence_length)
        out.update(zip(chunk, embeds, strict=True))
    return out


def release_text_encoder(pipe, offload: str, placement: str) -> bool:
    """After encoding: move a ``free`` text encoder off the device under ``model`` offload, as the
    plan's denoise stage assumes (streaming modes hold it in RAM between uses already). True if moved."""
    if placement != "free" or offload != "model" or pipe.text_encoder is None:
        return False
    import torch

    pipe.text_encoder.to("cpu")
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return True


def variant_for(model: Any, base: Any = None) -> str | None:
    """The sampling variant of the pipeline that will run ``model`` (see
    :func:`zopt.families.zimage.variants.variant_of`), found without loading anything: the ``base``
    folder, else ``model``'s own pipeline folder, else the source folder an artifact's manifest
    names. None when none of these says (a lone ``.gguf`` file: pass ``--base`` or ``--preset``)."""
    import os
    from pathlib import Path

    from ..families import for_config, resolve_source

    family = for_config({})
    for cand in (base, model):
        if not isinstance(cand, (str, os.PathLike)):
            continue
        p = Path(os.fspath(resolve_source(os.fspath(cand))))
        folders = [p]
        if cand is model and (p / "zopt-manifest.json").exists():
            from ..formats.artifact import read_manifest

            try:
                src = Path(str(read_manifest(p).get("source", {}).get("path", "")))
            except ZoptError:
                src = None
            folders = [src, src.parent] if src else []
        for folder in folders:
            if (folder / "model_index.json").exists():
                return family.variant_of(folder)
    return None


def resolve_for(model: Any, base: Any = None, preset: str | None = None, **explicit: Any) -> tuple[Sampling, str | None]:
    """(settings, variant) for generating with ``model``: :func:`resolve` with the family's presets
    and the variant :func:`variant_for` finds."""
    from ..families import for_config

    variant = variant_for(model, base)
    return resolve(for_config({}).presets(), preset, variant, **explicit), variant
