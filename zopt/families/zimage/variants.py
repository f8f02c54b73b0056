"""Z-Image (Base) and Z-Image-Turbo: one architecture, two ways to sample it.

Turbo is distilled for 8 transformer forwards without classifier-free guidance; Base (released
2026-01-27) is sampled with guidance 3-5, a negative prompt, 28-50 steps, and CFG normalization
on for realism, off for stylized images (the Z-Image model card). Their transformers have the same
tensors and their pipelines the same scheduler (``FlowMatchEulerDiscreteScheduler``, static
shift 3.0), so neither the weights nor the scheduler config tell them apart. :func:`variant_of`
reads, in this order:

1. ``zopt.json`` in the pipeline folder: ``"variant": "turbo"`` or ``"base"`` (zopt writes it for
   its built-in models; a user may add it to any folder);
2. the embedded pipelines without that field (``tiny``, ``micro``): Turbo, as their recipes are
   (8 steps, guidance 0);
3. the name the folder was saved from (``_name_or_path`` in ``model_index.json``), the folder's
   name and a Hub-cache parent (``models--Tongyi-MAI--Z-Image-Turbo``): a name containing
   ``turbo`` is Turbo, one containing ``z-image`` / ``zimage`` / ``z_image`` otherwise is Base.

Anything else is unknown (None): no preset is implied and no warning is given.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

TURBO, BASE = "turbo", "base"

# The recommended settings of each variant. Installed diffusers (>= 0.42) runs one transformer
# forward per step; the Turbo card's "num_inference_steps=9" was for older diffusers, whose 9
# steps gave the same 8 forwards.
PRESETS: dict[str, dict[str, Any]] = {
    TURBO: {"steps": 8, "guidance": 0.0, "cfg_normalization": 0.0, "cfg_truncation": 1.0},
    BASE: {"steps": 28, "guidance": 4.0, "cfg_normalization": 0.0, "cfg_truncation": 1.0},
}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    return obj if isinstance(obj, dict) else {}


def _by_name(name: str) -> str | None:
    low = name.lower()
    if "turbo" in low:
        return TURBO
    if any(k in low for k in ("z-image", "zimage", "z_image")):
        return BASE
    return None


def variant_of(folder: str | os.PathLike | None) -> str | None:
    """``"turbo"``, ``"base"`` or None (unknown) for a pipeline folder (see the module docstring)."""
    if folder is None:
        return None
    p = Path(folder)
    meta = _read_json(p / "zopt.json")
    if meta.get("variant") in PRESETS:
        return str(meta["variant"])
    if meta.get("kind") in ("tiny", "micro"):
        return TURBO
    names = [str(_read_json(p / "model_index.json").get("_name_or_path") or ""), p.name]
    names += [part for part in p.parts if part.startswith("models--")]
    for name in names:
        found = _by_name(name)
        if found:
            return found
    return None


def base_pipeline_dir(turbo_dir: str | os.PathLike) -> Path:
    """A Base-style copy of the embedded pipeline at ``turbo_dir`` (built once, beside it).

    Same weights (hard links where the file system allows), same scheduler config (see the module
    docstring), and ``zopt.json`` saying ``"variant": "base"``, so generation defaults to the
    Base preset: guidance 4 with a negative prompt, 28 steps.
    """
    import shutil

    from ..._io import build_cached

    src = Path(turbo_dir)

    def link_or_copy(a: str, b: str) -> None:
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    def build(tmp: Path) -> None:
        shutil.copytree(src, tmp, dirs_exist_ok=True, copy_function=link_or_copy)
        meta = _read_json(src / "zopt.json")
        (tmp / "zopt.json").unlink(missing_ok=True)  # a hard link: never write through it
        (tmp / "zopt.json").write_text(json.dumps({**meta, "variant": BASE, "from": src.name}))

    return build_cached(src.parent / f"{src.name}-base", build)
