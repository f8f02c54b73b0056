"""Model families, looked up by name, by a config's class name, or recognized from tensor names.

One line per family in :data:`FAMILIES`; each family lives in its own subpackage and is imported
only when first asked for. See :mod:`zopt.families.base` for what a family provides.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

from ..errors import UnknownArchitecture
from .base import Detection, Family, SensitiveRule

__all__ = ["FAMILIES", "DEFAULT", "Detection", "Family", "SensitiveRule", "names", "get", "detect",
           "for_config", "for_model", "resolve_source"]

# name -> "module:attribute" of its Family object
FAMILIES: dict[str, str] = {
    "zimage": "zopt.families.zimage.family:ZIMAGE",
}
# The family of configs and manifests that name no model class (written before families existed).
DEFAULT = "zimage"


def names() -> list[str]:
    return list(FAMILIES)


def get(name: str) -> Family:
    """The family registered as ``name``."""
    try:
        target = FAMILIES[name]
    except KeyError:
        raise UnknownArchitecture(f"unknown model family {name!r}; known: {', '.join(FAMILIES)}") from None
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def detect(source: Any) -> Family:
    """The family whose tensor names ``source`` (a TensorSource or a list of names) has."""
    problems = []
    for name in FAMILIES:
        fam = get(name)
        try:
            fam.detect(source)
            return fam
        except UnknownArchitecture as e:
            problems.append(e.problem)
    path = getattr(source, "path", None)
    raise UnknownArchitecture("; ".join(problems) if len(problems) == 1 else
                              "no known model family: " + "; ".join(problems), path)


def for_config(config: dict[str, Any]) -> Family:
    """The family whose model class a diffusers config names (``_class_name``)."""
    cls = config.get("_class_name")
    if cls is None:
        return get(DEFAULT)
    for name in FAMILIES:
        fam = get(name)
        if fam.model_class_name == cls:
            return fam
    raise UnknownArchitecture(f"no model family has the class {cls!r}")


def for_model(model: Any) -> Family:
    """The family of a loaded transformer: by its class (or a base class), else by its config.

    (A diffusers model's ``config`` carries no ``_class_name`` until saved; stand-ins such as the
    ONNX runtime module carry their artifact's config, which does.)
    """
    classes = {c.__name__ for c in type(model).__mro__}
    for name in FAMILIES:
        fam = get(name)
        if fam.model_class_name in classes:
            return fam
    return for_config(dict(getattr(model, "config", None) or {}))


def resolve_source(source: Any) -> Any:
    """A built-in source name (``tiny``) -> the folder of that model, built on first use.

    Anything else (an existing path, a Hub id, an open TensorSource) comes back unchanged, so the
    read path only ever sees real files: the entry points (the facade, the commands, convert/load
    and the runtime) call this before :func:`zopt.checkpoint.open`.
    """
    if not isinstance(source, (str, os.PathLike)) or Path(source).expanduser().exists():
        return source
    spec = os.fspath(source)
    for name in FAMILIES:
        build = get(name).builtin_sources().get(spec)
        if build is not None:
            return build()
    return source
