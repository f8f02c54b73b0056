"""The Z-Image family object: the :class:`~zopt.families.base.Family` protocol over this package."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ...checkpoint import TensorSource
from ..base import Detection, Family
from . import config as _config
from . import keys as _keys
from .sensitive import SENSITIVE


def _micro_pipeline() -> Path:
    from .micro.model import micro_pipeline_dir

    return micro_pipeline_dir()


def _tiny_pipeline() -> Path:
    from .tiny import tiny_pipeline_dir

    return tiny_pipeline_dir()


def _tiny_base_pipeline() -> Path:
    from .variants import base_pipeline_dir

    # derived from whatever ``tiny`` resolves to, so both always share their weights
    return base_pipeline_dir(ZIMAGE.builtin_sources()["tiny"]())


class ZImageFamily(Family):
    """Z-Image / Z-Image-Turbo (and the Omni variant's extra tensors)."""

    name = _keys.FAMILY
    model_class_name = _config.DIFFUSERS_CLASS
    pipeline_class_name = _config.PIPELINE_CLASS
    sensitive = SENSITIVE

    def detect(self, source: list[str] | TensorSource, metadata: dict[str, str] | None = None) -> Detection:
        return _keys.detect(source, metadata)

    def to_diffusers_name(self, name: str) -> str:
        return _keys.to_diffusers_name(name)

    def to_original_name(self, name: str) -> str:
        return _keys.to_original_name(name)

    def as_diffusers(self, src: TensorSource) -> TensorSource:
        return _keys.as_diffusers(src)

    def as_original(self, src: TensorSource, prefix: str = "") -> TensorSource:
        return _keys.as_original(src, prefix)

    def block_index(self, name: str) -> tuple[str, int] | None:
        return _keys.block_index(name)

    lora_prefixes = _keys.LORA_PREFIXES

    def lora_aliases(self, modules: list[str]) -> dict[str, tuple[str, ...]]:
        return _keys.lora_aliases(modules)

    def config_for(self, size: str) -> dict[str, Any]:
        return _config.config_for(size)

    def infer_config(self, src: TensorSource) -> dict[str, Any]:
        return _config.infer_config(src)

    def expected_shapes(self, config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
        return _config.expected_shapes(config)

    def check_shapes(self, src: TensorSource, config: dict[str, Any] | None = None) -> dict[str, Any]:
        return _config.check_shapes(src, config)

    def graph_module(self, model, half=None, tables: dict[str, Any] | None = None):
        from .graph import ZImageGraph

        return ZImageGraph(model, half, tables=tables)

    def graph_tables(self, config: dict[str, Any]) -> dict[str, Any]:
        from .graph import rope_tables

        return rope_tables(config)

    def graph_inputs(self, config: dict[str, Any], batch: int = 2, height: int = 16, width: int = 12,
                     text_len: int = 37, seed: int = 0) -> tuple[Any, ...]:
        from .graph import graph_inputs

        return graph_inputs(config, batch, height, width, text_len, seed)

    def builtin_sources(self) -> dict[str, Callable[[], Path]]:
        # ``tiny`` is the trained micro model (images that follow a shapes prompt, so quality and
        # adherence figures mean something); ``tiny-random`` is the seeded random pipeline at the
        # synthetic ``tiny`` size, for tests that need its shapes (rows of 256 for every K-quant)
        return {"tiny": _micro_pipeline, "micro": _micro_pipeline, "tiny-base": _tiny_base_pipeline,
                "tiny-random": _tiny_pipeline}

    def builtin_config(self, name: str) -> dict[str, Any] | None:
        """The transformer config of built-in source ``name`` (None for an unknown name)."""
        if name in ("tiny", "micro", "tiny-base"):
            from .micro import model as micro

            return dict(micro.TRANSFORMER_CONFIG)
        if name == "tiny-random":
            return self.config_for("tiny")
        return None

    def builtin_defaults(self, name: str) -> dict[str, Any]:
        if self.builtin_config(name) != self.builtin_config("micro"):
            return {}
        # the trained micro model knows 64 px scenes of procedural shapes, nothing else
        from .micro import adherence, model

        return {"resolution": f"{model.IMAGE_SIZE}x{model.IMAGE_SIZE}", "prompts": adherence.held_out_prompts(4),
                "steps": 8}  # the sampling it was evaluated with (the bench otherwise times 4 steps)

    def variant_of(self, folder: str | os.PathLike | None) -> str | None:
        from .variants import variant_of

        return variant_of(folder)

    def presets(self) -> dict[str, dict[str, Any]]:
        from .variants import PRESETS

        return {k: dict(v) for k, v in PRESETS.items()}

    def random_model(self, config: dict[str, Any], seed: int):
        from .tiny import build_tiny_transformer

        return build_tiny_transformer(seed, config)

    def write_synthetic(self, out: str | os.PathLike, size: str = "full", seed: int = 0, prefix: str = "",
                        progress: bool = True) -> Path:
        from .synthetic import write_synthetic

        return write_synthetic(out, size=size, seed=seed, prefix=prefix, progress=progress)


ZIMAGE = ZImageFamily()
