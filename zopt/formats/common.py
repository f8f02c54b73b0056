"""Helpers format loaders share: build an empty model of a config's family and fill it tensor by tensor."""

from __future__ import annotations

from typing import Any


def empty_model(config: dict[str, Any]):
    """The model of ``config``'s family (its ``_class_name``) on the meta device (no memory)."""
    from ..families import for_config

    return for_config(config).empty_model(config)


def set_tensor(model, name: str, value) -> None:
    """Replace parameter/buffer ``name`` of ``model`` by ``value`` (as a frozen Parameter)."""
    import torch

    mod_name, _, attr = name.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    if isinstance(getattr(mod, attr, None), torch.nn.Parameter) or attr in mod._parameters:
        mod._parameters[attr] = torch.nn.Parameter(value, requires_grad=False)
    else:
        setattr(mod, attr, value)


def replace_module(model, name: str, new) -> None:
    """Swap submodule ``name`` (e.g. ``layers.0.attention.to_q``) for ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def check_no_meta(model, path) -> None:
    """Raise if any parameter was left on the meta device (a tensor missing from the artifact)."""
    from ..errors import ShapeMismatch

    for n, p in list(model.named_parameters()) + list(model.named_buffers()):
        if p.device.type == "meta":
            raise ShapeMismatch(f"artifact has no tensor for {n}", path)
