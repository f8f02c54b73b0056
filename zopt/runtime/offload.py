"""Offloading: keep weights in system RAM (or on disk) and move them to the device as needed.

Modes, fastest first (all are diffusers' hooks):

``none``          everything resident on the device (``pipe.to(device)``).
``model``         ``enable_model_cpu_offload``: one whole component (text encoder, transformer, VAE) on
                  the device at a time.
``group-stream``  ``enable_group_offload(offload_type="block_level", num_blocks_per_group=1,
                  use_stream=True)``: transformer blocks stream in on a side CUDA stream while the
                  previous block computes (CUDA/ROCm only; pins the offloaded weights in RAM).
``group``         the same without streams: each block is copied in when it runs.
``sequential``    ``enable_sequential_cpu_offload``: every leaf module is copied in when it runs
                  (least device memory, slowest).
``disk``          group offload with ``offload_to_disk_path``: weights wait on disk, not in RAM (for
                  machines whose system RAM cannot hold the model either).

On a CPU device there is nothing to move weights *to*: ``auto`` gives ``none``, and ``model``,
``group``, ``group-stream`` and ``sequential`` are refused with an explanation; ``disk`` is
allowed (group offload to disk, onloading to CPU), trading speed for system RAM. Apple MPS shares
one memory pool with the CPU, so moving weights saves nothing there either: ``auto`` gives
``none`` and asking for a mode runs it but says so.

Quantized modules hold their weights in buffers (packed codes, scales); every mode moves buffers
as they are, so quantized weights stay quantized in RAM and travel packed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..errors import ZoptError
from ..platform.hardware import Hardware

MODES = ("none", "model", "group-stream", "group", "sequential", "disk")
GIB = 1024**3


@dataclass(frozen=True)
class Footprint:
    """Bytes a generation needs. Weights as loaded on the device; activations at their peak."""

    transformer: int
    text_encoder: int
    vae: int
    activations: int  # transformer forward peak (the largest of the three components' peaks)
    largest_block: int  # one transformer block's weights
    non_block: int  # transformer weights outside the blocks (embedders, final layer)
    largest_leaf: int  # the largest single module sequential offload moves at once

    @property
    def weights(self) -> int:
        return self.transformer + self.text_encoder + self.vae


@dataclass(frozen=True)
class OffloadChoice:
    mode: str
    reason: str
    device_bytes: int  # predicted peak device memory in this mode


def reserve(hw: Hardware) -> int:
    """Device memory kept free for the CUDA/HIP context, allocator fragmentation and the VAE decode."""
    if hw.device in ("cuda", "rocm", "xpu"):
        return max(GIB // 2, int(0.05 * hw.total_memory))
    return int(0.05 * hw.total_memory)


def device_bytes(mode: str, fp: Footprint) -> int:
    """Peak device memory of ``fp`` under offload ``mode`` (the memory model the rules compare)."""
    if mode == "none":
        return fp.weights + fp.activations
    if mode == "model":
        return max(fp.text_encoder, fp.transformer, fp.vae) + fp.activations
    if mode in ("group", "disk"):
        # the current block plus the non-block weights, which stay small
        return fp.non_block + fp.largest_block + fp.activations
    if mode == "group-stream":
        return fp.non_block + 2 * fp.largest_block + fp.activations  # next block prefetched
    if mode == "sequential":
        return fp.largest_leaf + fp.activations
    raise ZoptError(f"unknown offload mode {mode!r}; choose auto or one of {', '.join(MODES)}")


def choose(requested: str, hw: Hardware, fp: Footprint) -> OffloadChoice:
    """Pick (``auto``) or validate an offload mode for ``fp`` on ``hw``; the reason states the numbers.

    Rules for ``auto`` on an accelerator, with budget = free device memory - :func:`reserve`:
    the first of none, model, group-stream (CUDA/ROCm) or group, sequential whose predicted peak
    fits the budget; and disk instead of any offload mode when system RAM cannot hold the weights.
    """
    if requested not in ("auto", *MODES):
        raise ZoptError(f"unknown offload mode {requested!r}; choose auto or one of {', '.join(MODES)}")
    budget = hw.free_memory - reserve(hw)
    if hw.device == "cpu":
        if requested in ("auto", "none"):
            return OffloadChoice("none", "CPU device: weights already live in system RAM", device_bytes("none", fp))
        if requested != "disk":
            raise ZoptError(f"--offload {requested} moves weights between an accelerator and system RAM; on a CPU "
                            "device it would do nothing. Use --offload none, or disk to keep weights on disk")
        return OffloadChoice("disk", "disk requested", device_bytes("disk", fp))
    if requested == "group-stream" and not hw.has_streams:
        raise ZoptError(f"--offload group-stream needs CUDA streams; {hw.device} has none: use --offload group")
    if hw.device == "mps":
        need = device_bytes("none", fp)
        if requested == "auto":
            if need > budget:
                raise ZoptError(f"does not fit: needs {_gb(need)} of unified memory, {_gb(budget)} usable; offloading "
                                "saves nothing on unified memory: choose a smaller format (see zopt plan)")
            return OffloadChoice("none", f"unified memory: needs {_gb(need)} of {_gb(budget)} usable", need)
        if requested != "none":
            return OffloadChoice(requested, f"{requested} requested (unified memory: it saves no memory)", need)
    if requested != "auto":
        need = device_bytes(requested, fp)
        note = "" if need <= budget else f" (predicted {_gb(need)} > {_gb(budget)} budget: may run out of memory)"
        return OffloadChoice(requested, f"{requested} requested{note}", need)
    order = ["none", "model", "group-stream" if hw.has_streams else "group", "sequential"]
    for mode in order:
        need = device_bytes(mode, fp)
        if need <= budget:
            why = f"needs {_gb(need)} of {_gb(budget)} usable ({_gb(hw.free_memory)} free - {_gb(reserve(hw))} reserve)"
            if mode != "none" and hw.system_free and fp.weights > 0.9 * hw.system_free:
                return OffloadChoice("disk", f"{why}, but {_gb(fp.weights)} of weights exceed free system RAM "
                                     f"({_gb(hw.system_free)}): offload to disk", device_bytes("disk", fp))
            return OffloadChoice(mode, why, need)
    need = device_bytes("sequential", fp)
    raise ZoptError(f"does not fit even with sequential offload: needs {_gb(need)} of device memory, "
                    f"{_gb(budget)} usable; choose a smaller format or resolution (see zopt plan)")


def apply(pipe, mode: str, device: str, disk_dir: str | os.PathLike | None = None,
          skip: tuple[str, ...] = ()) -> None:
    """Install offload ``mode`` on a pipeline whose components are still on CPU; components named in
    ``skip`` stay where they are (e.g. a text encoder that runs on the host)."""
    import torch

    dev = torch.device(device)
    modules = {n: c for n, c in pipe.components.items() if isinstance(c, torch.nn.Module)}
    if mode == "none":
        for name, comp in modules.items():
            if name not in skip:
                comp.to(dev)
    elif mode in ("model", "sequential"):
        # diffusers offloads every component it sees (and moves excluded ones to the device):
        # hide the skipped ones while it installs its hooks
        held = {name: modules[name] for name in skip if name in modules}
        for name in held:
            setattr(pipe, name, None)
        try:
            if mode == "model":
                pipe.enable_model_cpu_offload(device=dev)
            else:
                pipe.enable_sequential_cpu_offload(device=dev)
        finally:
            for name, comp in held.items():
                setattr(pipe, name, comp)
    elif mode in ("group", "group-stream", "disk"):
        if mode == "disk" and disk_dir is None:
            raise ZoptError("--offload disk needs a folder for the offloaded weights")
        # streams exist on CUDA/ROCm only; a CPU standing in for a GPU runs the same groups without them
        stream = mode == "group-stream" and dev.type == "cuda"
        kwargs = dict(onload_device=dev, offload_device=torch.device("cpu"), offload_type="block_level",
                      num_blocks_per_group=1, use_stream=stream, non_blocking=stream)
        # Per component, each with its own disk folder: group ids such as "layers_0_0" repeat across the
        # text encoder and the transformer, and one shared folder would let their files overwrite each other.
        from diffusers.hooks import apply_group_offloading

        for name, comp in modules.items():
            if name in skip:
                continue
            extra = {}
            if mode == "disk":
                extra["offload_to_disk_path"] = os.fspath(os.path.join(disk_dir, name))
                os.makedirs(extra["offload_to_disk_path"], exist_ok=True)
            if hasattr(comp, "enable_group_offload"):
                comp.enable_group_offload(**kwargs, **extra)
            else:
                apply_group_offloading(module=comp, **kwargs, **extra)
    else:
        raise ZoptError(f"unknown offload mode {mode!r}; choose auto or one of {', '.join(MODES)}")


def _gb(n: float) -> str:
    return f"{n / GIB:.1f} GiB"
