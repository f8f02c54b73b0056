"""A format that lives outside zopt: the walkthrough of docs/formats.md, used by test_registry.py.

Linear weights the policy quantizes are stored as float16, everything else as it is in the
source; ``load`` rebuilds the model from the artifact alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zopt._io import atomic_path
from zopt.families import zimage
from zopt.formats.artifact import (
    read_manifest,
    source_provenance,
    verify_manifest,
    write_config,
    write_manifest,
)
from zopt.formats.options import Options
from zopt.policy import Policy
from zopt.safetensors_io import StreamingSafetensorsWriter

WEIGHTS = "diffusion_pytorch_model.safetensors"


@dataclass(frozen=True)
class ToyOptions(Options):
    scale: float = field(default=1.0)  # multiplies every quantized weight (1.0: none)


def convert(src, out: Path, subtype: str | None, options: ToyOptions, progress: bool, *, format: str = "toy") -> Path:
    import torch

    d = zimage.as_diffusers(src)
    config = zimage.check_shapes(src)
    policy = Policy.from_options(options)
    decisions = {n: policy.decide(n, d.info(n).shape) for n in d.names()}
    entries = [(n, "F16" if decisions[n].quantize else d.info(n).dtype, d.info(n).shape) for n in d.names()]
    with atomic_path(out, is_dir=True) as tmp:
        write_config(tmp, config)
        with StreamingSafetensorsWriter(tmp / WEIGHTS, entries, {"format": "pt"}) as w:
            for n in d.names():
                t = d.get(n)
                w.write(n, (t.float() * options.scale).to(torch.float16) if decisions[n].quantize else t)
        write_manifest(tmp, format=format, subtype=subtype, options=options.recorded(),
                       source=source_provenance(src, options.hash_source), config=config,
                       tensors={n: {"storage": e[1], "reason": decisions[n].reason}
                                for n, e in zip(d.names(), entries, strict=True)})
    return out


def load(path: Path, device: str, backend: str, dtype: Any = None):
    from zopt.formats.plain import load_source

    manifest = verify_manifest(path, read_manifest(path))
    opts = ToyOptions.from_dict(manifest["options"], format=manifest["format"])
    model = load_source(path, device=device, dtype=dtype)
    model.toy_options = opts
    return model
