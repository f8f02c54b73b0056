"""Attention kernels: which of diffusers' dispatcher backends can run here, and which to use.

diffusers routes every Z-Image attention call through ``dispatch_attention_fn``; a model picks a
kernel with ``model.set_attention_backend(name)``. Each entry below states that kernel's
requirements as the same predicates the format backends use, so ``zopt doctor`` can explain a
refusal on any (simulated) machine; :func:`apply` additionally runs diffusers' own check on the
real machine before switching.

Z-Image passes an attention mask only when the sequences in a batch differ in length: several
prompts of different token counts, or one prompt and its negative prompt under classifier-free
guidance (guidance > 0 runs both as one batch of two). The plain flash-attn 2/3 and SageAttention
kernels refuse masks, so for batches > 1 or guidance > 0 ``auto`` picks their ``varlen`` forms,
which take the mask, and asking for a mask-less kernel there is refused.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UnsupportedFormat, ZoptError
from ..platform.backends import (
    Requirement,
    needs_any,
    needs_cc,
    needs_device,
    needs_package,
    needs_rocm_arch,
)
from ..platform.hardware import Hardware


@dataclass(frozen=True)
class AttentionBackend:
    name: str  # diffusers AttentionBackendName value
    requires: tuple[Requirement, ...]
    description: str
    auto_rank: int | None  # order for ``auto`` (higher first); None: only when asked for by name
    masks: bool  # accepts an attention mask (needed for batches of unequal prompt lengths)
    half_only: bool = False  # bf16/fp16 inputs only
    memory: str = "linear"  # "linear": O(tokens) workspace; "quadratic": materializes the score matrix

    def why_not(self, hw: Hardware) -> list[str]:
        return [r.missing for r in self.requires if not r(hw)]


_GPU = needs_device("cuda", "rocm", "xpu", "mps")
_FA2_GPU = needs_any(needs_cc(8, 0), needs_rocm_arch("gfx90a", "gfx94", "gfx95"))
_FA2 = needs_package("flash_attn", pip="'flash-attn>=2.6.3'")
_FA3 = needs_package("flash_attn_interface", how="build FlashAttention-3 (hopper/ in the flash-attention repo)")
_SAGE = needs_package("sageattention", pip="'sageattention>=2.1.1'")
_KERNELS = needs_package("kernels", how="pip install 'kernels>=0.12' (fetches the kernel from the Hugging Face Hub)")

ATTENTION: dict[str, AttentionBackend] = {
    a.name: a
    for a in (
        AttentionBackend("native", (), "torch scaled_dot_product_attention (picks flash/efficient/math itself)",
                         10, True),
        AttentionBackend("_native_math", (), "torch SDPA math kernel (reference; materializes scores)", None,
                         True, memory="quadratic"),
        AttentionBackend("_native_efficient", (needs_device("cuda", "rocm"),), "torch SDPA memory-efficient kernel",
                         None, True),
        AttentionBackend("_native_flash", (needs_any(needs_cc(8, 0), needs_rocm_arch("gfx90a", "gfx94", "gfx95")),),
                         "torch SDPA flash kernel", None, False, half_only=True),
        AttentionBackend("_native_cudnn", (needs_cc(8, 0),), "torch SDPA cuDNN kernel", None, True,
                         half_only=True),
        AttentionBackend("flex", (), "torch flex_attention (fast only under torch.compile)", None, True),
        AttentionBackend("flash", (_FA2_GPU, _FA2), "flash-attn 2", 30, False, half_only=True),
        AttentionBackend("flash_varlen", (_FA2_GPU, _FA2), "flash-attn 2, variable length (takes masks)", 29, True,
                         half_only=True),
        AttentionBackend("_flash_3", (needs_cc(9, 0, below=(10, 0)), _FA3), "flash-attn 3 (Hopper)", 40, False,
                         half_only=True),
        AttentionBackend("_flash_varlen_3", (needs_cc(9, 0, below=(10, 0)), _FA3),
                         "flash-attn 3 (Hopper), variable length (takes masks)", 39, True, half_only=True),
        AttentionBackend("xformers", (needs_device("cuda", "rocm"), needs_package("xformers", pip="'xformers>=0.0.29'")),
                         "xformers memory-efficient attention", 20, True),
        # SageAttention quantizes Q/K to INT8: faster but not exact, so auto never picks it.
        AttentionBackend("sage", (needs_cc(8, 0), _SAGE), "SageAttention 2 (INT8 QK, approximate)", None, False,
                         half_only=True),
        AttentionBackend("sage_varlen", (needs_cc(8, 0), _SAGE), "SageAttention 2, variable length", None, True,
                         half_only=True),
        AttentionBackend("flash_hub", (needs_cc(8, 0), _KERNELS), "flash-attn 2 kernel fetched from the Hub",
                         None, False, half_only=True),
        AttentionBackend("_flash_3_hub", (needs_cc(9, 0, below=(10, 0)), _KERNELS),
                         "flash-attn 3 kernel fetched from the Hub", None, False, half_only=True),
        AttentionBackend("sage_hub", (needs_cc(8, 0), _KERNELS), "SageAttention kernel fetched from the Hub", None,
                         False, half_only=True),
        AttentionBackend("aiter_fa2_hub", (needs_rocm_arch("gfx94", "gfx95"), _KERNELS),
                         "AMD aiter flash-attn (CK) fetched from the Hub", None, False, half_only=True),
    )
}


@dataclass(frozen=True)
class AttentionChoice:
    name: str
    reason: str


def needs_masks(batch: int = 1, guidance: float = 0.0) -> bool:
    """Whether attention may see sequences of unequal length: several prompts, or CFG's negative prompt."""
    return batch > 1 or guidance > 0


def why_not(name: str, hw: Hardware, dtype: str = "bf16", batch: int = 1, guidance: float = 0.0) -> list[str]:
    """What stops attention backend ``name`` on ``hw`` for ``dtype`` inputs, ``batch`` and CFG
    ``guidance`` (empty: runs)."""
    a = _get(name)
    out = a.why_not(hw)
    if a.half_only and dtype not in ("bf16", "fp16"):
        out.append(f"needs bf16/fp16 activations (running {dtype}; zopt generate --dtype bf16 runs bf16)")
    if needs_masks(batch, guidance) and not a.masks:
        why = "batches of several prompts" if batch > 1 else "guidance > 0 batches the negative prompt"
        out.append(f"does not take attention masks ({why}); use its varlen form or native")
    return out


def choose(requested: str, hw: Hardware, dtype: str = "bf16", batch: int = 1,
           guidance: float = 0.0) -> AttentionChoice:
    """``auto`` -> the best exact kernel available; a name -> that one, or a ZoptError saying what to install."""
    if requested and requested != "auto":
        missing = why_not(requested, hw, dtype, batch, guidance)
        if missing:
            raise UnsupportedFormat(f"attention backend {requested!r} cannot run here: {'; '.join(missing)}")
        return AttentionChoice(requested, f"{requested} requested")
    ranked = sorted((a for a in ATTENTION.values() if a.auto_rank is not None), key=lambda a: -a.auto_rank)
    passed = []
    for a in ranked:
        missing = why_not(a.name, hw, dtype, batch, guidance)
        if not missing:
            note = f" (unavailable: {', '.join(passed)})" if passed else ""
            return AttentionChoice(a.name, f"{a.name}: {a.description}{note}")
        passed.append(a.name)
    raise UnsupportedFormat("no attention backend can run here")  # native has no requirements: unreachable


def check_installed(name: str) -> None:
    """Run diffusers' own requirement check for ``name`` on this machine (packages, versions)."""
    from diffusers.models.attention_dispatch import (
        AttentionBackendName,
        _check_attention_backend_requirements,
    )

    try:
        _check_attention_backend_requirements(AttentionBackendName(name))
    except ValueError:
        raise UnsupportedFormat(f"diffusers {_diffusers_version()} has no attention backend {name!r}") from None
    except RuntimeError as e:
        raise ZoptError(f"attention backend {name!r} is not usable: {e}") from None


def runs_torch_attention(transformer) -> bool:
    """Whether ``transformer`` has diffusers attention layers to switch (an ONNX or TensorRT graph
    runs attention inside its runtime, whatever was asked for)."""
    return any(hasattr(m, "processor") for m in transformer.modules())


def apply(transformer, name: str) -> None:
    """Switch every attention layer of ``transformer`` to ``name`` (after checking it is installed)."""
    check_installed(name)
    from diffusers.utils import logging as dlog

    level = dlog.get_verbosity()
    dlog.set_verbosity_error()  # set_attention_backend warns "experimental" on every call
    try:
        transformer.set_attention_backend(name)
    finally:
        dlog.set_verbosity(level)


def _get(name: str) -> AttentionBackend:
    try:
        return ATTENTION[name]
    except KeyError:
        raise UnsupportedFormat(f"unknown attention backend {name!r}; known: auto, {', '.join(ATTENTION)}") from None


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__
