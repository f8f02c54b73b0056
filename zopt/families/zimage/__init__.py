"""Z-Image / Z-Image-Turbo: detection, key layouts, precision-sensitive tensors, configs, builders.

The family object is :data:`ZIMAGE` (``zopt.families.get("zimage")``); the modules behind it:

* :mod:`.keys`: the diffusers and original layouts, detection, lazy views in either layout;
* :mod:`.sensitive`: tensors that keep F32/BF16 and why;
* :mod:`.config`: the named sizes (full, medium, tiny), inference from shapes, the shape check;
* :mod:`.graph`: the tensor-in / tensor-out module traced for ONNX export (imports torch);
* :mod:`.tiny` and :mod:`.synthetic`: the embedded tiny pipeline and the streamed synthetic checkpoint.

The names below are re-exported so ``from zopt.families import zimage; zimage.detect(...)`` works.
"""

from __future__ import annotations

from ..base import Detection, SensitiveRule
from ..views import MappedSource
from .config import (
    CONFIGS,
    DIFFUSERS_CLASS,
    FULL_CONFIG,
    FULL_NUM_PARAMS,
    MEDIUM_CONFIG,
    PIPELINE_CLASS,
    TINY_CONFIG,
    axes_dims_for,
    check_shapes,
    config_for,
    expected_shapes,
    infer_config,
)
from .family import ZIMAGE, ZImageFamily
from .keys import (
    FAMILY,
    ORIGINAL_PREFIXES,
    as_diffusers,
    as_original,
    block_index,
    detect,
    strip_prefix,
    to_diffusers_name,
    to_original_name,
)
from .sensitive import REFINER_PATTERN, SENSITIVE, sensitive_reason

__all__ = [
    "CONFIGS", "DIFFUSERS_CLASS", "FAMILY", "FULL_CONFIG", "FULL_NUM_PARAMS", "MEDIUM_CONFIG", "ORIGINAL_PREFIXES",
    "PIPELINE_CLASS", "REFINER_PATTERN", "SENSITIVE", "TINY_CONFIG", "ZIMAGE", "Detection", "MappedSource",
    "SensitiveRule", "ZImageFamily", "as_diffusers", "as_original", "axes_dims_for", "block_index",
    "check_shapes", "config_for", "detect", "expected_shapes", "infer_config", "sensitive_reason",
    "strip_prefix", "to_diffusers_name", "to_original_name",
]
