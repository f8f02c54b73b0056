"""zopt calibrate: forward hooks collect per-channel statistics of every Linear's input, keyed by
the GGUF tensor names; the command writes a GGUF imatrix and refuses bad input with exit 2."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from zopt.cli import main
from zopt.formats.imatrix import read
from zopt.runtime.calibrate import Collector, calibrate, tensor_name


def test_hooks_accumulate_sum_of_squares_count_and_absmax():
    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList([torch.nn.Module()])
    ff = torch.nn.Module()
    ff.w2 = torch.nn.Linear(8, 4)
    model.layers[0].feed_forward = ff
    col = Collector(model)
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(3, 5, 8, generator=g) for _ in range(2)]
    for x in xs:
        ff.w2(x)
    col.close()
    ff.w2(torch.full((1, 8), 100.0))  # after close: not counted
    st = col.result(["t"], 2, 1).entries["layers.0.feed_forward.w2.weight"]
    allx = torch.cat([x.reshape(-1, 8) for x in xs]).double()
    np.testing.assert_allclose(st.sum2, allx.square().sum(0).numpy(), rtol=1e-6)
    assert st.count == 30
    np.testing.assert_allclose(st.absmax, allx.abs().amax(0).float().numpy(), rtol=1e-6)


def test_names_follow_the_gguf_layout():
    assert tensor_name("layers.3.attention.to_q") == "layers.3.attention.qkv.weight"
    assert tensor_name("layers.3.attention.to_k") is None and tensor_name("layers.3.attention.to_v") is None
    assert tensor_name("layers.3.attention.to_out.0") == "layers.3.attention.out.weight"
    assert tensor_name("all_x_embedder.2-1") == "x_embedder.weight"


def test_pipeline_calibration_covers_every_linear(tmp_path, tiny_dir):
    from zopt import checkpoint
    from zopt.families import zimage

    im = calibrate(tiny_dir, ["a red circle", "a blue square"], steps=2, resolution=64, device="cpu")
    view = zimage.as_original(checkpoint.open(tiny_dir / "transformer"))
    linears = {n for n in view.names() if n.endswith(".weight") and len(view.info(n).shape) == 2}
    assert set(im.entries) == linears
    for name, st in im.entries.items():
        assert st.count > 0 and st.sum2.shape == (view.info(name).shape[1],), name
        assert np.all(st.absmax ** 2 * st.count >= st.sum2 * (1 - 1e-5)), name  # max^2 bounds the mean square
    assert im.datasets[0].startswith("pipeline: 2 prompts, 2 steps")


def test_cli_writes_a_readable_imatrix(tmp_path, tiny_dir):
    out = tmp_path / "tiny.imatrix"
    assert main(["calibrate", str(tiny_dir / "transformer"), "-o", str(out), "--inputs", "random", "--steps", "2",
                 "--resolution", "64", "--device", "cpu"]) == 0
    im = read(out)
    assert im.datasets[0].startswith("random") and "layers.0.feed_forward.w2.weight" in im.entries
    assert main(["calibrate", str(tiny_dir / "transformer"), "-o", str(out), "--inputs", "random"]) == 2  # exists


@pytest.mark.parametrize("case", ["missing_source", "empty_prompts", "bad_steps"])
def test_cli_bad_input_exit_2_one_line(tmp_path, tiny_dir, capsys, case):
    out = tmp_path / "x.imatrix"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n  \n")
    argv = {
        "missing_source": ["calibrate", str(tmp_path / "nope.safetensors"), "-o", str(out)],
        "empty_prompts": ["calibrate", str(tiny_dir), "-o", str(out), "--prompts", str(prompts)],
        "bad_steps": ["calibrate", str(tiny_dir), "-o", str(out), "--steps", "0"],
    }[case]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0]
    assert not out.exists()


def test_random_inputs_load_the_model_in_bfloat16_where_float32_does_not_fit(tmp_path, tiny_dir, monkeypatch, capsys):
    """The transformer of a random-input calibration is loaded whole: float32 where it takes at most
    half the free memory, bfloat16 where that fits, else a one-line refusal before any loading."""
    import math

    import psutil

    from zopt import checkpoint
    from zopt.runtime import pipeline

    src = checkpoint.open(tiny_dir / "transformer")
    params = sum(math.prod(src.info(n).shape) for n in src.names())
    seen = []
    memory = psutil.virtual_memory()

    load = pipeline.load_transformer
    monkeypatch.setattr(pipeline, "load_transformer", lambda *a, **k: seen.append(k["dtype"]) or load(*a, **k))
    for free, dtype in ((10 * params * 4, torch.float32), (params * 4, torch.bfloat16)):
        monkeypatch.setattr(psutil, "virtual_memory", lambda free=free: memory._replace(available=free))
        im = calibrate(tiny_dir / "transformer", ["x"], steps=1, resolution=64, device="cpu", inputs="random")
        assert seen[-1] == dtype and "layers.0.feed_forward.w2.weight" in im.entries
        assert im.datasets[0].endswith("bfloat16") == (dtype == torch.bfloat16)  # the file says so
    monkeypatch.setattr(psutil, "virtual_memory", lambda: memory._replace(available=params))
    out = tmp_path / "x.imatrix"
    assert main(["calibrate", str(tiny_dir / "transformer"), "-o", str(out), "--inputs", "random", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bfloat16" in err[0] and "--inputs pipeline" in err[0] and not out.exists()
    assert len(seen) == 2  # refused before loading
