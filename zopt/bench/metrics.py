"""Measurements: peak memory, latency statistics and quality deltas against the reference.

Everything here works on plain tensors, arrays and numbers so it can be tested without running a
pipeline. Heavy imports (torch, scikit-image, lpips) happen inside the functions that need them.
"""

from __future__ import annotations

import math
import os
import threading
from pathlib import Path
from typing import Any

PSNR_CAP_DB = 100.0  # identical images have infinite PSNR; JSON has no infinity, so cap it


# ------------------------------------------------------------------------------------------
# memory


def _ru_maxrss_bytes() -> int:
    try:
        import resource
        import sys

        v = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(v if sys.platform == "darwin" else v * 1024)  # Linux reports KiB, macOS bytes
    except (ImportError, OSError):
        return 0


class PeakMemory:
    """Peak memory of the code inside ``with PeakMemory(device) as pm:``.

    CPU: peak resident set size above the RSS at entry (the process baseline: interpreter, torch,
    diffusers already imported). A thread samples RSS every ``interval`` seconds; the kernel's
    high-water mark (``ru_maxrss``) makes the peak exact whenever it rose inside the block.
    CUDA: ``torch.cuda.max_memory_allocated`` / ``max_memory_reserved`` since entry.
    Device memory outside torch's allocator (onnxruntime, TensorRT, workspaces): the per-process
    counter of :mod:`zopt.bench.devmem` (NVML on NVIDIA, the Metal driver on MPS) is sampled by the
    same thread; ``counter`` in the result names what ``peak_bytes`` was read from. With NVML,
    ``peak_bytes`` is the larger of NVML's growth and torch's allocated growth (memory torch's
    cache already held shows no growth in NVML).
    """

    def __init__(self, device: str = "cpu", interval: float = 0.005):
        self.device = device
        self.interval = interval
        self.baseline = 0
        self.peak = 0
        self.cuda_allocated: int | None = None
        self.cuda_reserved: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.device_counter: str | None = None
        self._device_read = None
        self.device_baseline = self.device_peak = 0

    def _rss(self) -> int:
        import psutil

        return int(psutil.Process(os.getpid()).memory_info().rss)

    def _sample(self) -> None:
        import psutil

        proc = psutil.Process(os.getpid())
        while not self._stop.wait(self.interval):
            if self._device_read is not None:
                self.device_peak = max(self.device_peak, self._device_read())
            try:
                self.peak = max(self.peak, int(proc.memory_info().rss))
            except psutil.Error:
                return

    def __enter__(self) -> PeakMemory:
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline = int(torch.cuda.memory_allocated(self.device))
        from .devmem import counter

        found = counter(self.device) if self.device != "cpu" else None
        if found is not None:
            self.device_counter, self._device_read = found
            self.device_baseline = self.device_peak = self._device_read()
        self._ru_start = _ru_maxrss_bytes()
        self.rss_baseline = self._rss()
        self.peak = self.rss_baseline
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, self._rss())
        if self._device_read is not None:
            self.device_peak = max(self.device_peak, self._device_read())
        ru_end = _ru_maxrss_bytes()
        if ru_end > self._ru_start:  # the process high-water mark was set inside the block
            self.peak = max(self.peak, ru_end)
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize(self.device)
            self.cuda_allocated = int(torch.cuda.max_memory_allocated(self.device))
            self.cuda_reserved = int(torch.cuda.max_memory_reserved(self.device))

    def as_dict(self) -> dict[str, Any]:
        rss_peak = max(0, self.peak - self.rss_baseline)
        if self.device_counter is not None:
            counted = max(0, self.device_peak - self.device_baseline)
            allocated = max(0, self.cuda_allocated - self.baseline) if self.cuda_allocated is not None else None
            # NVML sees the process's device memory, torch's cache included: a step whose tensors
            # fit blocks the cache already held grows it by nothing, while torch's peak above the
            # entry's allocation still counts them. Both are lower bounds of what the block needed;
            # the larger is reported, each is kept.
            return {"kind": self.device.split(":")[0], "counter": self.device_counter,
                    "peak_bytes": max(counted, allocated or 0), "counter_peak_bytes": counted,
                    "allocator_peak_bytes": allocated,
                    "baseline_bytes": self.device_baseline, "cuda_max_allocated": self.cuda_allocated,
                    "cuda_max_reserved": self.cuda_reserved, "host_rss_peak_bytes": rss_peak}
        if self.cuda_allocated is not None:
            return {"kind": "cuda", "counter": "torch-allocator", "peak_bytes": max(0, self.cuda_allocated - self.baseline),
                    "baseline_bytes": self.baseline, "cuda_max_allocated": self.cuda_allocated,
                    "cuda_max_reserved": self.cuda_reserved, "host_rss_peak_bytes": rss_peak}
        return {"kind": "cpu_rss", "counter": "process-rss", "peak_bytes": rss_peak, "baseline_bytes": self.rss_baseline,
                "cuda_max_allocated": None, "cuda_max_reserved": None}


# ------------------------------------------------------------------------------------------
# latency


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100) of a non-empty list."""
    xs = sorted(values)
    if not xs:
        raise ValueError("percentile of an empty list")
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def latency_stats(values: list[float], scale: float = 1.0, digits: int = 4) -> dict[str, Any]:
    """Median, p90, mean, min, max and count of ``values`` (each multiplied by ``scale``)."""
    if not values:
        return {"median": None, "p90": None, "mean": None, "min": None, "max": None, "n": 0}
    xs = [v * scale for v in values]
    return {"median": round(percentile(xs, 50), digits), "p90": round(percentile(xs, 90), digits),
            "mean": round(sum(xs) / len(xs), digits), "min": round(min(xs), digits),
            "max": round(max(xs), digits), "n": len(xs)}


# ------------------------------------------------------------------------------------------
# quality


def _flat(x):
    import torch

    if isinstance(x, (list, tuple)):
        return torch.cat([t.detach().float().flatten().cpu() for t in x])
    return x.detach().float().flatten().cpu()


def rel_l2(output, reference) -> float:
    """||output - reference|| / ||reference|| over all elements (lists of tensors are concatenated)."""
    a, b = _flat(output), _flat(reference)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {tuple(a.shape)} vs {tuple(b.shape)}")
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def cosine(output, reference) -> float:
    """Cosine similarity of the flattened tensors (1.0 means same direction)."""
    a, b = _flat(output), _flat(reference)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {tuple(a.shape)} vs {tuple(b.shape)}")
    den = (a.norm() * b.norm()).clamp_min(1e-30)
    return float((a @ b) / den)


def psnr(image, reference, data_range: float = 255.0) -> float:
    """PSNR in dB of two same-shape images (uint8 arrays or PIL images), capped at PSNR_CAP_DB."""
    import numpy as np

    a = np.asarray(image, dtype=np.float64)
    b = np.asarray(reference, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"image shape mismatch: {a.shape} vs {b.shape}")
    mse = float(np.mean((a - b) ** 2))
    if mse == 0.0:
        return PSNR_CAP_DB
    return min(PSNR_CAP_DB, 10.0 * math.log10(data_range**2 / mse))


def ssim(image, reference) -> float:
    """Structural similarity (scikit-image, per channel averaged) of two uint8 RGB images."""
    import numpy as np

    try:
        from skimage.metrics import structural_similarity
    except ImportError:
        from ..errors import MissingDependency

        raise MissingDependency("scikit-image", "bench", "SSIM") from None
    a, b = np.asarray(image), np.asarray(reference)
    if a.shape != b.shape:
        raise ValueError(f"image shape mismatch: {a.shape} vs {b.shape}")
    win = min(7, min(a.shape[0], a.shape[1]) // 2 * 2 - 1)  # odd, no larger than the image
    return float(structural_similarity(a, b, channel_axis=-1 if a.ndim == 3 else None, data_range=255,
                                       win_size=max(3, win)))


class Lpips:
    """LPIPS (AlexNet) when the ``lpips`` package, torchvision and *both* weight files are already
    on this machine. Nothing is ever downloaded: otherwise ``available`` is False and ``status``
    says what is missing (recorded as "not available: ...")."""

    def __init__(self) -> None:
        self.model = None
        self.status = self._load()

    @property
    def available(self) -> bool:
        return self.model is not None

    def _load(self) -> str:
        import importlib.util

        for pkg in ("lpips", "torchvision"):
            if importlib.util.find_spec(pkg) is None:
                return f"not available: package {pkg} is not installed"
        import torch

        spec = importlib.util.find_spec("lpips")
        lin = Path(spec.origin).parent / "weights" / "v0.1" / "alex.pth"
        if not lin.exists():
            return f"not available: {lin} is missing"
        ckpt = Path(torch.hub.get_dir()) / "checkpoints"
        if not any(ckpt.glob("alexnet-*.pth")):
            return f"not available: AlexNet weights are not in {ckpt} (never downloaded by zopt)"
        try:
            import lpips

            self.model = lpips.LPIPS(net="alex", verbose=False).eval()
        except Exception as e:  # a broken local install must not stop the benchmark
            return f"not available: {e.__class__.__name__}: {str(e)[:120]}"
        return "ok"

    def __call__(self, image, reference) -> float | None:
        if self.model is None:
            return None
        import numpy as np
        import torch

        def to_t(im):
            x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 127.5 - 1.0)
            return x.permute(2, 0, 1).unsqueeze(0)

        with torch.no_grad():
            return float(self.model(to_t(image), to_t(reference)).flatten()[0])


def summarize_steps(per_step: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean/max relative L2 and min/mean cosine over per-step entries."""
    l2 = [s["rel_l2"] for s in per_step]
    cs = [s["cosine"] for s in per_step]
    if not l2:
        return {"rel_l2_mean": None, "rel_l2_max": None, "cosine_min": None, "cosine_mean": None}
    return {"rel_l2_mean": round(sum(l2) / len(l2), 6), "rel_l2_max": round(max(l2), 6),
            "cosine_min": round(min(cs), 6), "cosine_mean": round(sum(cs) / len(cs), 6)}


def artifact_bytes(path: str | os.PathLike) -> int:
    """Total size of a file, or of every file under a folder."""
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def bits_per_weight(nbytes: int | None, params: int | None) -> float | None:
    """Effective bits per weight: artifact bytes * 8 / parameter count (everything counted)."""
    if not nbytes or not params:
        return None
    return round(nbytes * 8 / params, 4)
