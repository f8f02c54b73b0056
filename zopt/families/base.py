"""The Family protocol: everything zopt knows about one model architecture, behind one object.

A family answers, for its checkpoints:

* **keys**: is this source mine (:meth:`Family.detect`), and how do the diffusers and original
  (ComfyUI / reference release) layouts map onto each other, as lazy views both ways;
* **precision**: which tensors must stay in higher precision, and why (:attr:`Family.sensitive`);
* **configs**: the named configs (``full``, ``tiny``, ...), the config of a source (its
  ``config.json`` or inferred from shapes) and a check of every tensor against a config;
* **classes**: the diffusers model and pipeline classes, and an empty model for a config;
* **ONNX graph hooks**: the tensor-in / tensor-out module traced for export, its constant tables
  and example inputs;
* **built-in models**: sources zopt builds itself (``tiny``), seeded random models of any config
  and a streamed synthetic checkpoint.

Formats, the runtime and the bench reach a family through :mod:`zopt.families` (by name, by a
config's class name, or detected from tensor names), never by importing its classes.
"""

from __future__ import annotations

import os
import re
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..checkpoint import TensorSource


@dataclass(frozen=True)
class SensitiveRule:
    """A tensor-name pattern (diffusers names) and the least precision a converter must keep."""

    pattern: str
    keep: str  # "F32" or "BF16"
    reason: str
    # the GGUF type every quantized recipe stores it in (None: ``keep``, as the other formats do)
    gguf: str | None = None
    # the least GGUF type a size-targeted recipe (gguf:auto) may give it; None: measurement decides
    auto_least: str | None = None


@dataclass(frozen=True)
class Detection:
    """What a family recognized in a source."""

    family: str
    variant: str
    layout: str  # "diffusers" | "original"
    prefix: str  # key prefix found in the file ("" if none)


class Family(ABC):
    """One model architecture. Subclasses fill the class attributes and the abstract methods."""

    name: str  # registry key, written into manifests
    model_class_name: str  # diffusers class of the transformer; a config's ``_class_name``
    pipeline_class_name: str  # diffusers pipeline class that runs it
    sensitive: tuple[SensitiveRule, ...] = ()  # first match wins

    # -- keys -------------------------------------------------------------------------------

    @abstractmethod
    def detect(self, source: list[str] | TensorSource, metadata: dict[str, str] | None = None) -> Detection:
        """Recognize this family from tensor names; raise UnknownArchitecture otherwise."""

    @abstractmethod
    def to_diffusers_name(self, name: str) -> str:
        """One tensor name, original layout (or prefixed) -> diffusers layout."""

    @abstractmethod
    def to_original_name(self, name: str) -> str:
        """One tensor name, diffusers layout -> original layout."""

    @abstractmethod
    def as_diffusers(self, src: TensorSource) -> TensorSource:
        """A lazy view of ``src`` with diffusers names and shapes."""

    @abstractmethod
    def as_original(self, src: TensorSource, prefix: str = "") -> TensorSource:
        """A lazy view of ``src`` with original-layout names, optionally prefixed."""

    # -- LoRA key names ---------------------------------------------------------------------

    lora_prefixes: tuple[str, ...] = ()  # model prefixes LoRA files put before a module path

    def lora_aliases(self, modules: list[str]) -> dict[str, tuple[str, ...]]:
        """Module paths a LoRA file may name -> the diffusers Linear modules (``modules``) each
        updates, stacked on the output dimension in that order (a fused layer names several)."""
        from ..errors import UnsupportedFormat

        raise UnsupportedFormat(f"no LoRA key map for model family {self.name!r}")

    # -- precision --------------------------------------------------------------------------

    def sensitive_reason(self, name: str) -> SensitiveRule | None:
        """The rule that makes ``name`` (either layout) precision-sensitive, or None."""
        dname = self.to_diffusers_name(name)
        for rule in self.sensitive:
            if re.search(rule.pattern, dname):
                return rule
        return None

    @abstractmethod
    def block_index(self, name: str) -> tuple[str, int] | None:
        """(block stack, index) of a block tensor name (either layout), else None."""

    # -- configs ----------------------------------------------------------------------------

    @abstractmethod
    def config_for(self, size: str) -> dict[str, Any]:
        """A copy of a named config (at least ``full`` and ``tiny``)."""

    @property
    def default_config(self) -> dict[str, Any]:
        """The full-size config: what planning assumes when it knows nothing else."""
        return self.config_for("full")

    @abstractmethod
    def infer_config(self, src: TensorSource) -> dict[str, Any]:
        """The diffusers config of a source: its config.json if it has one, else derived from shapes."""

    @abstractmethod
    def expected_shapes(self, config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
        """Diffusers tensor names and shapes for ``config``, without building a model."""

    @abstractmethod
    def check_shapes(self, src: TensorSource, config: dict[str, Any] | None = None) -> dict[str, Any]:
        """Verify ``src`` against its (inferred) config; raise ShapeMismatch naming the first bad tensor."""

    # -- model and pipeline classes ---------------------------------------------------------

    def model_class(self) -> type:
        import diffusers

        return getattr(diffusers, self.model_class_name)

    def pipeline_class(self) -> type:
        import diffusers

        return getattr(diffusers, self.pipeline_class_name)

    def empty_model(self, config: dict[str, Any]):
        """The model for ``config`` on the meta device (no memory), in eval mode."""
        import torch

        kwargs = {k: v for k, v in config.items() if not k.startswith("_")}
        with torch.device("meta"):
            model = self.model_class()(**kwargs)
        model.register_to_config(**{k: v for k, v in config.items() if k.startswith("_") and k != "_class_name"})
        return model.eval()

    # -- ONNX graph hooks -------------------------------------------------------------------

    @abstractmethod
    def graph_module(self, model, half=None, tables: dict[str, Any] | None = None):
        """``model`` wrapped as a tensor-in / tensor-out module that ``torch.onnx.export`` can trace."""

    @abstractmethod
    def graph_tables(self, config: dict[str, Any]) -> dict[str, Any]:
        """Constant tables the graph module holds as buffers (stored as initializers)."""

    @abstractmethod
    def graph_inputs(self, config: dict[str, Any], batch: int = 2, height: int = 16, width: int = 12,
                     text_len: int = 37, seed: int = 0) -> tuple[Any, ...]:
        """Seeded example inputs of the graph module."""

    # -- built-in models --------------------------------------------------------------------

    def builtin_sources(self) -> dict[str, Callable[[], Path]]:
        """Source names zopt builds itself (e.g. ``tiny``) -> a function returning the built folder."""
        return {}

    def builtin_config(self, name: str) -> dict[str, Any] | None:
        """The transformer config of built-in source ``name`` (how a converted copy of it finds its
        text encoder and VAE); None for a name this family does not build."""
        return None

    def builtin_defaults(self, name: str) -> dict[str, Any]:
        """What the commands default to for built-in source ``name`` where the user gives nothing:
        ``resolution`` ("WxH"), ``prompts`` (a list) and ``steps`` (what ``zopt bench`` samples), for a
        model that only learned a few things."""
        return {}

    # -- sampling ---------------------------------------------------------------------------

    def variant_of(self, folder: str | os.PathLike | None) -> str | None:
        """Which sampling variant a pipeline folder holds (a key of :meth:`presets`), None if unknown."""
        return None

    def presets(self) -> dict[str, dict[str, Any]]:
        """Named sampling settings (steps, guidance, cfg_normalization, cfg_truncation) per variant."""
        return {}

    @abstractmethod
    def random_model(self, config: dict[str, Any], seed: int):
        """The real model class at ``config``, every parameter drawn from ``seed`` (for tests and benchmarks)."""

    @abstractmethod
    def write_synthetic(self, out: str | os.PathLike, size: str = "full", seed: int = 0, prefix: str = "",
                        progress: bool = True) -> Path:
        """Stream a seeded random checkpoint of a named size to ``out``."""

    def __repr__(self) -> str:
        return f"<family {self.name}>"
