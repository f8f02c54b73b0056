"""LoRA: files in the layouts people publish, merged into weights before converting or run as
low-rank branches beside quantized layers.

* :mod:`.files`: ``FILE[:SCALE]`` specs, reading, layout detection (diffusers/PEFT, kohya/ComfyUI);
* :mod:`.resolve`: a file matched against a model through its family's key map (fused qkv split,
  separate q/k/v stacked), with one-line errors for LoRAs that do not fit;
* :mod:`.merge`: a source view that merges LoRAs into each weight as a converter streams it;
* :mod:`.runtime`: run-time branches on a loaded model (:func:`add_loras`, :func:`set_lora_scale`,
  :func:`remove_loras`).

See ``docs/lora.md``.
"""

from __future__ import annotations

from .files import LoraError, LoraSpec, read
from .merge import MergedSource, merged_source
from .resolve import Branch, Lora, stack
from .runtime import add_loras, lora_info, remove_loras, set_lora_scale

__all__ = ["Branch", "Lora", "LoraError", "LoraSpec", "MergedSource", "add_loras", "lora_info", "merged_source",
           "read", "remove_loras", "set_lora_scale", "stack"]
