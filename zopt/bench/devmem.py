"""Device memory counters that see more than torch's allocator.

torch's caching allocator does not know about memory that onnxruntime, TensorRT, cuBLAS
workspaces or the CUDA context hold. On NVIDIA GPUs, NVML reports the memory each process holds
on the device (``nvidia-ml-py``, imported only here); on Apple MPS, ``torch.mps`` reports what the
Metal driver has allocated for this process. :func:`counter` returns the best one available, as a
name and a zero-argument function returning bytes.
"""

from __future__ import annotations

import os
from collections.abc import Callable


def _nvml(device_index: int = 0) -> Callable[[], int] | None:
    try:
        import pynvml  # nvidia-ml-py
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(device_index)
    except Exception:  # no driver, no device: NVML raises its own error types
        return None
    pid = os.getpid()

    def read() -> int:
        try:
            procs = pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
        except Exception:
            return 0
        return int(sum(p.usedGpuMemory or 0 for p in procs if p.pid == pid))

    return read


def counter(device: str) -> tuple[str, Callable[[], int]] | None:
    """(name, read) of the widest per-process device memory counter for ``device``, or None."""
    import torch

    if device.startswith("cuda") and torch.cuda.is_available() and not getattr(torch.version, "hip", None):
        index = int(device.split(":")[1]) if ":" in device else torch.cuda.current_device()
        read = _nvml(index)
        # a counter that reads 0 while this process holds a CUDA context does not see this process
        # (NVML lists processes by the driver's process ids, which need not be this one's): it would
        # report every peak as 0, so it is not used and the caller falls back to torch's counters
        if read is not None:
            torch.cuda.init()
            torch.cuda.mem_get_info(index)  # creates the context NVML would list, if it is not there yet
            if read() > 0:
                return "nvml-process", read
    if device.startswith("mps") and hasattr(torch, "mps"):
        return "mps-driver", lambda: int(torch.mps.driver_allocated_memory())
    return None
