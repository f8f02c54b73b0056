"""Quantized bytes pinned: every type, with and without an importance vector, on an input whose
values are exact in float32 (no random generator, no transcendental functions), so the digests
hold on any machine. The legacy and float types are also checked against gguf-py byte for byte
(test_ggml_quants.py); the K types against ggml's C quantizer where stable-diffusion.cpp's library
is installed. These digests were recorded from the quantizers as they were verified then and catch
any later change of bytes, on machines without that library too."""

from __future__ import annotations

import hashlib

import pytest
import torch

from zopt.formats.gguf import quants as gq

DIGESTS = {  # type: (sha256 of quantize(x)[:32], of quantize(x, importance=imp)[:32])
    "F32": ("da65cceae304d5bb43aa4e898e4b92f0", "da65cceae304d5bb43aa4e898e4b92f0"),
    "F16": ("0f7cdbba68164d05c3a521bbec9de82e", "0f7cdbba68164d05c3a521bbec9de82e"),
    "BF16": ("2d250a7a1f0f2a0d6727542b37827538", "2d250a7a1f0f2a0d6727542b37827538"),
    "Q8_0": ("c8f226aedee975a49eca72222b1af0bb", "c8f226aedee975a49eca72222b1af0bb"),
    "Q5_1": ("6c7f0248ee1159d4a4ef02d35161e534", "2658742fd5cf6728fb6448e562e27ad8"),
    "Q5_0": ("c80ef3192df042a5c6e42ba078814d56", "93c0a2aaa211eb3cba1bfa92fe2cc5c2"),
    "Q4_1": ("5f670ec3e68db4f75828f8563cbe5e22", "3c836ba2637907cc6543e762eed3dfdb"),
    "Q4_0": ("8d6b10f0c62c69c2d976032d87e1e300", "13fdceb631e88e6bb43de86ed7eb39a7"),
    "Q6_K": ("bcc1dc43b2cd60f1c0a861e8a94cc373", "17299e451c206c4493ecd6ebd9d01a82"),
    "Q5_K": ("6140db93e7164fd91f8e16e6c666c3ff", "cfcfd279bd0163fe988eb072a8dd7d2b"),
    "Q4_K": ("29d68d5a60e0e1002b398aef4a42f8a7", "86ebe3e465a8c8ab2202f0c9b416bff5"),
    "Q3_K": ("6e62310ceae6c0ad5f71de5d31f48cc5", "eda57dfb29dce3830ede673f974b40ed"),
    "Q2_K": ("5deb08b63f79f9f7057a05bda9815c48", "04091fafbc25f318a9335cdb635fec83"),
}


def exact_matrix(rows: int = 12, cols: int = 512) -> torch.Tensor:
    """Rows of small integers over powers of two (exact in float32), plus degenerate rows."""
    i = torch.arange(rows).reshape(-1, 1)
    j = torch.arange(cols).reshape(1, -1)
    x = (((i * 131 + j * 71) % 257) - 128).float() / 64
    x = x * torch.pow(2.0, (i % 5) - 2).float()
    x[0] = 0  # all-zero blocks
    x[1] = 0.75  # constant blocks
    x[2, 3::32] = 40.0  # one outlier per block
    return x


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.numpy().tobytes()).hexdigest()[:32]


def test_every_supported_type_is_pinned():
    assert set(DIGESTS) == set(gq.SUPPORTED)


@pytest.mark.parametrize("name", gq.SUPPORTED)
def test_quantized_bytes_unchanged(name):
    x = exact_matrix()
    imp = 1 + (torch.arange(x.shape[1]) % 7).float() / 8
    plain, weighted = DIGESTS[name]
    assert _digest(gq.quantize(x, name)) == plain
    assert _digest(gq.quantize(x, name, importance=imp)) == weighted
