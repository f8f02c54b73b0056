"""Offload rules on every simulated machine, and diffusers' hooks on the tiny pipeline on CPU."""

from __future__ import annotations

import dataclasses

import pytest

from zopt.errors import ZoptError
from zopt.families import zimage
from zopt.platform.fakes import FAKES
from zopt.runtime import offload as O
from zopt.runtime import planner

GIB = 1024**3


def full_footprint(spec="bf16", res=1024, elem=2, batch=1):
    cand = next(c for c in planner.CANDIDATES if c.spec == spec)
    shape = planner.shape_for(res, res, batch)
    return planner.footprint(zimage.FULL_CONFIG, cand, shape, res, res, elem)


@pytest.mark.parametrize("machine", list(FAKES))
@pytest.mark.parametrize("spec", ["bf16", "fp8", "gguf:Q4_K_M"])
@pytest.mark.parametrize("res", [512, 1024, 2048])
def test_auto_picks_the_fastest_mode_that_fits(machine, spec, res):
    hw = FAKES[machine]
    fp = full_footprint(spec, res, 4 if hw.device == "cpu" else 2)
    budget = hw.free_memory - O.reserve(hw)
    try:
        ch = O.choose("auto", hw, fp)
    except ZoptError as e:
        if hw.unified_memory:  # nothing to offload to: only "none" counts
            assert "unified memory" in str(e) and O.device_bytes("none", fp) > budget
        else:
            assert "sequential" in str(e) and O.device_bytes("sequential", fp) > budget
        return
    if hw.unified_memory:
        assert ch.mode == "none"
        return
    order = ["none", "model", "group-stream" if hw.has_streams else "group", "sequential"]
    assert ch.mode in order or ch.mode == "disk"
    mode = ch.mode if ch.mode != "disk" else next(m for m in order if O.device_bytes(m, fp) <= budget)
    assert O.device_bytes(mode, fp) <= budget
    for faster in order[: order.index(mode)]:
        assert O.device_bytes(faster, fp) > budget, faster


def test_anchor_decisions():
    bf16 = full_footprint("bf16")
    assert O.choose("auto", FAKES["cuda-sm90-80gb"], bf16).mode == "none"
    assert O.choose("auto", FAKES["rocm-mi300x"], bf16).mode == "none"
    assert O.choose("auto", FAKES["cuda-sm80-24gb"], bf16).mode == "none"
    # 8 GB: the 4B text encoder alone exceeds the budget, so whole-model offload cannot work
    assert O.choose("auto", FAKES["cuda-sm89-8gb"], bf16).mode == "group-stream"
    assert O.choose("auto", FAKES["cpu-only"], full_footprint("bf16", elem=4)).mode == "none"
    # MPS shares one pool with the CPU: offloading saves nothing, so auto never offloads there
    small_mps = dataclasses.replace(FAKES["apple-mps"], free_memory=6 * GIB)
    with pytest.raises(ZoptError, match="unified memory"):
        O.choose("auto", small_mps, bf16)
    assert "saves no memory" in O.choose("group", small_mps, bf16).reason
    # a 24 GB card with 16 GB free: the transformer fits alone -> model offload
    busy = dataclasses.replace(FAKES["cuda-sm80-24gb"], free_memory=16 * GIB)
    assert O.choose("auto", busy, bf16).mode == "model"
    # system RAM cannot hold the offloaded weights -> disk
    poor = dataclasses.replace(FAKES["cuda-sm89-8gb"], system_free=12 * GIB)
    ch = O.choose("auto", poor, bf16)
    assert ch.mode == "disk" and "system RAM" in ch.reason
    # nothing fits
    with pytest.raises(ZoptError, match="sequential"):
        O.choose("auto", dataclasses.replace(FAKES["cuda-sm89-8gb"], free_memory=GIB), bf16)


def test_memory_order_of_modes():
    fp = full_footprint("bf16")
    need = [O.device_bytes(m, fp) for m in ("none", "model", "group-stream", "group", "sequential")]
    assert need == sorted(need, reverse=True) and len(set(need)) == 5
    assert O.device_bytes("disk", fp) == O.device_bytes("group", fp)


def test_cpu_refuses_modes_that_move_to_an_accelerator():
    hw, fp = FAKES["cpu-only"], full_footprint("bf16", elem=4)
    for mode in ("model", "group", "group-stream", "sequential"):
        with pytest.raises(ZoptError, match="on a CPU device it would do nothing"):
            O.choose(mode, hw, fp)
    assert O.choose("disk", hw, fp).mode == "disk"
    assert O.choose("none", hw, fp).mode == "none"
    with pytest.raises(ZoptError, match="needs CUDA streams"):
        O.choose("group-stream", FAKES["apple-mps"], fp)
    with pytest.raises(ZoptError, match="unknown offload mode"):
        O.choose("swap", FAKES["cuda-sm80-24gb"], fp)
    ch = O.choose("none", FAKES["cuda-sm89-8gb"], fp)  # explicit: honoured, with a warning in the reason
    assert ch.mode == "none" and "may run out of memory" in ch.reason


# --- diffusers hooks on the real tiny pipeline ----------------------------------------------------

def _image(mode, tmp_path):
    import numpy as np

    from zopt.runtime import pipeline as P

    pipe = P.build_pipeline("tiny", device="cpu")
    if mode != "none":
        O.apply(pipe, mode, "cpu", disk_dir=tmp_path / "offload")
    req = P.GenerateRequest(prompts=["a red cube"], seeds=[5], steps=1, height=64, width=64)
    res = P.run(pipe, req, tmp_path / mode)
    from PIL import Image

    return np.asarray(Image.open(res[0].path)).astype(int), pipe


def test_group_and_disk_offload_run_on_cpu_and_change_nothing(tmp_path):
    ref, _ = _image("none", tmp_path)
    grp, _ = _image("group", tmp_path)
    assert abs(grp - ref).max() <= 1
    disk, pipe = _image("disk", tmp_path)
    assert abs(disk - ref).max() <= 1
    assert list((tmp_path / "offload" / "transformer").glob("*.safetensors")), "group offload to disk wrote no weight files"


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["model", "group-stream", "group", "sequential"])
def test_offload_modes_on_cuda_match_resident(mode, tmp_path):
    import numpy as np
    from PIL import Image

    from zopt.runtime import pipeline as P

    def image(offload):
        pipe, choice = P.prepare("tiny", device="cuda", offload=offload, attention="auto", width=64, height=64)
        assert choice.offload == offload
        res = P.run(pipe, P.GenerateRequest(["a red cube"], [5], steps=2, height=64, width=64), tmp_path / offload)
        return np.asarray(Image.open(res[0].path)).astype(int)

    assert abs(image(mode) - image("none")).max() <= 2
