"""Mutated inputs of every kind zopt reads end in a clean one-line error or a correct read, never
in a raw exception, a hang or silently accepted tampering (deterministic: fixed seeds)."""

from __future__ import annotations

import random

import fuzz_cases as C
import fuzz_helpers as F
import pytest

# cases per kind: a few hundred each; the artifact kinds hash an 18 MB file per case
PER_KIND = {"safetensors": 300, "gguf": 300, "config": 250, "index": 250, "manifest": 200, "publish": 200,
            "lowbit": 120, "fp8comfy": 120}


@pytest.fixture(scope="module")
def bases(tmp_path_factory, tiny_transformer_dir, tiny_gguf):
    return F.make_bases(tmp_path_factory.mktemp("fuzz-bases"), tiny_transformer_dir, tiny_gguf("Q8_0"))


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(PER_KIND))
def test_mutated_inputs_fail_cleanly(kind, bases, tmp_path):
    cases = C.GENERATORS[kind](bases[kind], random.Random(f"fuzz-{kind}"), PER_KIND[kind])
    counts, details = F.run_all(cases, C.entries(), tmp_path, limit_s=20.0)
    assert len(cases) >= PER_KIND[kind]
    bad = details["unclean"] + details["hang"] + details["tampering"]
    assert not bad, f"{len(bad)} of {len(cases)} {kind} cases were not handled cleanly: {bad[:5]}"
    # the generator really produces rejected inputs, and the tampering ones are among them
    assert counts[(kind, "clean")] >= len(cases) // 2
    if kind in ("gguf", "manifest", "publish", "lowbit", "fp8comfy"):
        assert any(c.tamper for c in cases)
