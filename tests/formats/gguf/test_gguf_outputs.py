"""Sensitivity measured on the model's output (``--option calls=FILE``): the calls file written by
``zopt calibrate --save-calls``, its checks, and the property it is for: on the trained micro model,
a re-tuned recipe measured on calibration calls has less output error on other prompts' calls than
the default measurement, at no larger size."""

from __future__ import annotations

import math

import pytest
import torch

from zopt import checkpoint
from zopt.cli import main
from zopt.errors import ZoptError
from zopt.formats import convert
from zopt.formats.gguf.outputs import CALLS_FORMAT, read_calls, save_calls
from zopt.runtime.calibrate import calibrate

# calibration and evaluation captions drawn from the micro model's caption grammar with two seeds
# (as benchmarks/rate_distortion.py --inputs pipeline draws its evaluation captions)
CALIBRATION_SEED, HELD_OUT_SEED = 3_000_000, 2_000_000


@pytest.fixture(scope="module")
def micro_dir():
    """The trained micro model's pipeline folder (``tiny``)."""
    from zopt.families import resolve_source

    return resolve_source("tiny")


@pytest.fixture(scope="module")
def micro_transformer_dir(micro_dir):
    return micro_dir / "transformer"


@pytest.fixture(scope="module")
def calls_file(tmp_path_factory, micro_dir):
    from zopt.families.zimage.micro.adherence import held_out_prompts

    calls: list = []
    calibrate(micro_dir, held_out_prompts(2, seed=CALIBRATION_SEED), steps=8, resolution=64, device="cpu", calls=calls)
    return save_calls(calls, tmp_path_factory.mktemp("calls") / "micro.calls", "two captions, 8 steps, 64 px")


def test_calls_round_trip(calls_file, micro_transformer_dir):
    config = dict(checkpoint.open(micro_transformer_dir).config)
    c = read_calls(calls_file, config)
    assert len(c.items) == 2 * 8 and c.description == "two captions, 8 steps, 64 px" and len(c.sha256) == 64
    xs, t, caps = c.items[0]
    assert xs[0].shape[0] == config["in_channels"] and caps[0].shape[1] == config["cap_feat_dim"]
    assert t.numel() == len(xs) and 0 <= float(t[0]) <= 1


def test_bad_calls_files_are_refused_naming_the_file(tmp_path, calls_file, micro_transformer_dir):
    from safetensors.torch import save_file

    config = dict(checkpoint.open(micro_transformer_dir).config)
    with pytest.raises(ZoptError, match="no such calls file"):
        read_calls(tmp_path / "missing.calls", config)
    junk = tmp_path / "junk.calls"
    junk.write_bytes(b"not safetensors")
    with pytest.raises(ZoptError, match="cannot read calls file") as e:
        read_calls(junk, config)
    assert str(e.value.path) == str(junk)
    other = tmp_path / "other.safetensors"
    save_file({"a": torch.zeros(2)}, str(other), metadata={"format": "something else"})
    with pytest.raises(ZoptError, match="not a transformer calls file"):
        read_calls(other, config)
    wrong = tmp_path / "wrong.calls"
    save_calls([([torch.zeros(3, 1, 8, 8)], torch.tensor([0.5]), [torch.zeros(4, config["cap_feat_dim"])])], wrong, "")
    with pytest.raises(ZoptError, match="do not fit this model"):
        read_calls(wrong, config)
    cut = tmp_path / "cut.calls"
    save_file({"call.0.t": torch.zeros(1)}, str(cut), metadata={"format": CALLS_FORMAT, "calls": "1"})
    with pytest.raises(ZoptError, match="incomplete"):
        read_calls(cut, config)


def test_cli_refuses_calls_where_nothing_is_measured_and_bad_files(tmp_path, calls_file, micro_transformer_dir, capsys):
    out = tmp_path / "x.gguf"
    for spec, opts in (("gguf:Q6_K", []), ("gguf:Q4_K_M", ["--option", "allocation=rule"])):
        assert main(["convert", str(micro_transformer_dir), "--to", spec, "--option", f"calls={calls_file}",
                     *opts, "-o", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "calls=" in err[0] and not out.exists()
    junk = tmp_path / "junk.calls"
    junk.write_bytes(b"\x00" * 64)
    assert main(["convert", str(micro_transformer_dir), "--to", "gguf:Q4_K_M", "--option", f"calls={junk}",
                 "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "junk.calls" in err[0] and not out.exists()


def _output_error(path, items, refs) -> float:
    import zopt

    model = zopt.load(path, dtype=torch.float32, backend="torch-dequant")
    num = den = 0.0
    with torch.inference_mode():
        for (xs, t, caps), r in zip(items, refs, strict=True):
            y = torch.cat([o.float().flatten() for o in model(xs, t, caps, return_dict=False)[0]])
            num += float((y - r).square().sum())
            den += float(r.square().sum())
    return math.sqrt(num / den)


def test_output_measurement_and_gradient_gains_beat_the_weight_proxy_on_held_out_prompts(tmp_path, calls_file, micro_dir,
                                                                       micro_transformer_dir):
    from zopt.families.zimage.micro.adherence import held_out_prompts
    from zopt.formats.plain import load_source

    held: list = []
    calibrate(micro_dir, held_out_prompts(3, seed=HELD_OUT_SEED), steps=8, resolution=64, device="cpu", calls=held)
    ref = load_source(micro_transformer_dir, dtype=torch.float32)
    with torch.inference_mode():
        refs = [torch.cat([o.float().flatten() for o in ref(xs, t, caps, return_dict=False)[0]])
                for xs, t, caps in held]
    default = convert(micro_transformer_dir, "gguf:Q4_K_M", tmp_path / "default.gguf",
                      options={"sensitivity": "weights"}, progress=False)
    gradient = convert(micro_transformer_dir, "gguf:Q4_K_M", tmp_path / "gradient.gguf", progress=False)
    on_outputs = convert(micro_transformer_dir, "gguf:Q4_K_M", tmp_path / "outputs.gguf",
                         options={"calls": str(calls_file)}, progress=False)
    meta = checkpoint.open(on_outputs).metadata
    assert meta["zopt.sensitivity.calls.sha256"] == read_calls(calls_file).sha256
    rule = convert(micro_transformer_dir, "gguf:Q4_K_M", tmp_path / "rule.gguf", options={"allocation": "rule"},
                   progress=False)
    # both spend the rule's bytes: no larger than its file, the same size within 0.1%
    assert on_outputs.stat().st_size <= rule.stat().st_size and default.stat().st_size <= rule.stat().st_size
    assert abs(on_outputs.stat().st_size / default.stat().st_size - 1) < 0.001
    assert abs(gradient.stat().st_size / default.stat().st_size - 1) < 0.001
    e_default, e_outputs = _output_error(default, held, refs), _output_error(on_outputs, held, refs)
    e_gradient = _output_error(gradient, held, refs)
    # the benchmark's run on 4 held-out captions (docs/quality-per-bit.md): weight errors alone 0.0182,
    # with the gradient gains on random inputs (the default) 0.0143, measured on the calls 0.0096
    assert e_outputs < 0.8 * e_default, (e_outputs, e_default)
    assert e_gradient < 0.9 * e_default, (e_gradient, e_default)


def test_calibrate_cli_writes_the_calls_beside_the_imatrix(tmp_path, micro_dir, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a large red circle at the top left on a blue background\n")
    im, calls = tmp_path / "m.imatrix", tmp_path / "m.calls"
    args = ["calibrate", str(micro_dir), "-o", str(im), "--save-calls", str(calls), "--prompts", str(prompts),
            "--steps", "2", "--resolution", "64"]
    assert main(args) == 0
    assert "2 transformer calls" in capsys.readouterr().out
    assert im.is_file() and len(read_calls(calls).items) == 2
    im.unlink()
    assert main(args) == 2  # the calls file is there: refused before anything is written
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "m.calls" in err[0] and not im.exists()


def test_more_bad_calls_and_targets_are_refused_before_any_work(tmp_path, calls_file, micro_transformer_dir, capsys):
    from zopt.formats.imatrix import Imatrix, Stat
    from zopt.formats.imatrix import write as write_imatrix

    config = dict(checkpoint.open(micro_transformer_dir).config)
    dim = config["cap_feat_dim"]
    cases = {
        "nan.calls": [([torch.full((16, 1, 8, 8), float("nan"))], torch.tensor([0.5]), [torch.zeros(4, dim)])],
        "odd.calls": [([torch.zeros(16, 1, 3, 3)], torch.tensor([0.5]), [torch.zeros(4, dim)])],
        "empty-caption.calls": [([torch.zeros(16, 1, 8, 8)], torch.tensor([0.5]), [torch.zeros(0, dim)])],
        "two-captions.calls": [([torch.zeros(16, 1, 8, 8)], torch.tensor([0.5]), [torch.zeros(4, dim)] * 2)],
    }
    for name, items in cases.items():
        save_calls(items, tmp_path / name, "")
        with pytest.raises(ZoptError) as e:
            read_calls(tmp_path / name, config)
        assert str(e.value.path).endswith(name)
    im = tmp_path / "x.imatrix"
    write_imatrix(Imatrix({"a.weight": Stat(torch.ones(4).numpy(), 1.0, torch.ones(4).numpy())}, ["t"], 1, 1), im)
    with pytest.raises(ZoptError, match="--imatrix"):
        read_calls(im, config)
    with pytest.raises(ZoptError, match="is a folder"):
        read_calls(tmp_path, config)
    # a multi-target conversion refuses a target the option does not apply to before any target starts
    out = tmp_path / "multi"
    assert main(["convert", str(micro_transformer_dir), "-o", str(out), "--to", "gguf:Q4_K_M,gguf:Q8_0",
                 "--option", f"calls={calls_file}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Q8_0 has one rule" in err[0]
    assert not out.exists() or not any(out.iterdir())


def test_a_rule_file_the_calls_do_not_change_is_the_rule_file(tmp_path, calls_file, micro_transformer_dir):
    """--keep . leaves nothing to re-tune: the file is the rule's, byte for byte, without the calls' keys."""
    rule = convert(micro_transformer_dir, "gguf:Q4_K_M", tmp_path / "rule.gguf",
                   options={"allocation": "rule", "keep": ["."], "hash_source": False}, progress=False)
    with_calls = convert(micro_transformer_dir, "gguf:Q4_K_M", tmp_path / "calls.gguf",
                         options={"calls": str(calls_file), "keep": ["."], "hash_source": False}, progress=False)
    assert with_calls.stat().st_size <= rule.stat().st_size
    assert "zopt.sensitivity.calls.sha256" not in checkpoint.open(with_calls).metadata


def test_one_measured_type_scales_the_others_by_their_weight_errors(calls_file, micro_transformer_dir):
    """calls_types=one runs the calls once per tensor, at its cheapest type, and scales the other
    types' errors by their weight errors; on the trained micro model the scaled errors are within
    a factor of the ones every type's own run measures (the median of their ratios within 1.5x)."""
    import dataclasses
    import statistics

    from zopt.families import zimage
    from zopt.formats.gguf import auto
    from zopt.formats.gguf.outputs import OutputProbe
    from zopt.formats.gguf.recipes import TensorPlan

    src = checkpoint.open(micro_transformer_dir)
    probe = OutputProbe.from_source(src, calls_file, "one")
    probe.calls = dataclasses.replace(probe.calls, items=probe.calls.items[::4])  # 4 calls, 4 steps apart
    probe.refs = probe.refs[::4]
    view = zimage.as_original(src)
    ratios = []
    for name in ("layers.1.attention.qkv.weight", "layers.1.attention.out.weight", "layers.1.feed_forward.w1.weight",
                 "layers.1.feed_forward.w2.weight", "layers.1.adaLN_modulation.0.weight"):
        shape = tuple(view.info(name).shape)
        types = auto.candidates(shape)
        w = view.get(name).float().reshape(shape)
        plan, unit = TensorPlan(name, shape, types[0], ""), torch.ones(shape[-1])
        probe.types, before = "one", probe.runs
        one = probe.measure(plan, w, unit, types, 1)
        assert probe.runs == before + 1  # one pass over the calls for the tensor
        probe.types, before = "all", probe.runs
        every = probe.measure(plan, w, unit, types, 1)
        assert probe.runs == before + len(types)
        cheapest = min(types, key=lambda t: one.nbytes[t])
        assert one.errors[cheapest] == every.errors[cheapest] > 0
        exact = [t for t in types if every.errors[t] == 0]  # BF16: the stored weights themselves
        assert exact == ["BF16"] and one.errors["BF16"] == 0
        ratios += [one.errors[t] / every.errors[t] for t in types if t not in (cheapest, *exact)]
        # the scaled errors keep the weight errors' order: a more precise type never predicts more error here
        assert sorted(types, key=lambda t: (one.errors[t], -one.nbytes[t])) == \
            sorted(types, key=lambda t: one.nbytes[t], reverse=True)
    assert 1 / 1.5 < statistics.median(ratios) < 1.5, sorted(ratios)


def test_calls_types_without_calls_is_refused(tmp_path, micro_transformer_dir, capsys):
    out = tmp_path / "x.gguf"
    for way in ("all", "one"):
        assert main(["convert", str(micro_transformer_dir), "--to", "gguf:Q4_K_M", "--option", f"calls_types={way}",
                     "-o", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "calls_types" in err[0] and not out.exists()


def test_a_multi_target_pass_shares_one_probe_and_writes_the_single_target_files(tmp_path, calls_file,
                                                                                  micro_transformer_dir):
    """Two re-tuned targets measured on the calls in one pass: one model in memory for both (their
    threads loaded it at once and failed before), and each file the bytes of its own conversion."""
    from zopt.formats.gguf import outputs

    made = []
    real = outputs.OutputProbe.__init__

    def counting(self, *a, **k):
        made.append(1)
        real(self, *a, **k)

    opts = {"calls": str(calls_file), "hash_source": False}
    singles = {t: convert(micro_transformer_dir, f"gguf:{t}", tmp_path / f"{t}.gguf", options=opts, progress=False)
               for t in ("Q4_K_M", "Q5_K_M")}
    import unittest.mock

    from zopt.formats.multi import convert_many

    targets = [(f"gguf:{t}", tmp_path / f"multi-{t}.gguf") for t in singles]
    with unittest.mock.patch.object(outputs.OutputProbe, "__init__", counting):
        convert_many(micro_transformer_dir, targets, options=opts, progress=False)
    assert len(made) == 1
    for (spec, path), t in zip(targets, singles, strict=True):
        assert path.read_bytes() == singles[t].read_bytes(), spec


def test_gradient_gain_predicts_the_output_error_of_a_perturbation(micro_transformer_dir):
    """The gain from the model's gradient (``sensitivity=gradient``, the default) is the output error
    an i.i.d. perturbation of a tensor adds per unit of its squared size: measured by running the
    model with a small random perturbation of each tensor, on the same seeded random calls, the
    prediction is within 25% (three perturbations each) for tensors whose gains span orders of magnitude."""
    from zopt.families import zimage
    from zopt.formats.gguf.outputs import OutputProbe

    src = checkpoint.open(micro_transformer_dir)
    gradient = OutputProbe.from_source(src, None, "gradient")
    assert gradient.model is None and gradient.runs == 0  # gains only: the model's memory is given back
    run = OutputProbe.from_source(src, None, "one")
    view = zimage.as_original(src)
    g = torch.Generator().manual_seed(7)
    gains = []
    # tensors whose inputs are the tokens; not the timestep MLP and the adaLN modulations: their input is
    # one timestep embedding per call (a Jacobian of rank 4 here), on which one random perturbation's
    # error varies from draw to draw by up to 30x, and 4 random probes by tens of percent
    for name in ("x_embedder.weight", "final_layer.linear.weight", "layers.1.attention.out.weight",
                 "layers.0.feed_forward.w2.weight", "context_refiner.0.feed_forward.w2.weight",
                 "noise_refiner.0.feed_forward.w1.weight", "layers.2.attention.qkv.weight"):
        w = view.get(name).float()
        predicted = measured = 0.0
        for _ in range(3):
            delta = torch.randn(w.shape, generator=g) * 1e-3 * float(w.std())
            measured += run.error(name, w + delta)
            predicted += gradient.gain(name, w.numel()) * float(delta.square().sum())
        assert 0.8 < predicted / measured < 1.25, (name, predicted, measured)
        gains.append(gradient.gain(name, w.numel()))
    assert max(gains) / min(gains) > 100  # what a weight error alone (gain 1 for every tensor) misses


def test_default_and_weights_sensitivity_and_their_headers(tmp_path, calls_file, micro_transformer_dir, capsys):
    """Without calls the re-tuned recipes and gguf:auto weigh each tensor's weight error by its gradient
    gain on seeded random inputs (recorded in the header); ``sensitivity=weights`` writes the file the
    weight errors alone choose, without those keys; ``calls_types=gradient`` takes the gains on the
    calls, with no pass per tensor; the option is refused with calls and where nothing is measured."""
    import json

    default = convert(micro_transformer_dir, "gguf:Q4_K_M", tmp_path / "default.gguf",
                      options={"hash_source": False}, progress=False)
    meta = checkpoint.open(default).metadata
    d = json.loads(meta["zopt.sensitivity.calls.description"])
    assert d["measured_types"] == "gradient" and d["description"].startswith("random:") and d["calls"] == 4
    assert "zopt.sensitivity.calls.file" not in meta and "zopt.sensitivity.calls.sha256" not in meta  # no file
    weights = convert(micro_transformer_dir, "gguf:Q4_K_M", tmp_path / "weights.gguf",
                      options={"hash_source": False, "sensitivity": "weights"}, progress=False)
    assert not any(k.startswith("zopt.sensitivity.") for k in checkpoint.open(weights).metadata)
    assert json.loads(meta["zopt.auto.types"]) != json.loads(checkpoint.open(weights).metadata["zopt.auto.types"])
    again = convert(micro_transformer_dir, "gguf:Q4_K_M", tmp_path / "again.gguf",
                    options={"hash_source": False}, progress=False)
    assert again.read_bytes() == default.read_bytes()  # seeded inputs and probes: the same file
    on_calls = convert(micro_transformer_dir, "gguf:Q4_K_M", tmp_path / "calls.gguf",
                       options={"hash_source": False, "calls": str(calls_file), "calls_types": "gradient"},
                       progress=False)
    cm = checkpoint.open(on_calls).metadata
    assert cm["zopt.sensitivity.calls.sha256"] == read_calls(calls_file).sha256
    assert json.loads(cm["zopt.sensitivity.calls.description"])["measured_types"] == "gradient"
    out = tmp_path / "x.gguf"
    for spec, opts in (("gguf:Q4_K_M", ["sensitivity=weights", f"calls={calls_file}"]),
                       ("gguf:Q6_K", ["sensitivity=gradient"]),
                       ("gguf:Q4_K_M", ["sensitivity=gradient", "allocation=rule"]),
                       ("gguf:Q4_K_M", ["sensitivity=outputs"])):
        args = ["convert", str(micro_transformer_dir), "--to", spec, "-o", str(out)]
        for o in opts:
            args += ["--option", o]
        assert main(args) == 2, opts
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "sensitivity" in err[0] and not out.exists(), err


def test_without_memory_for_the_gradient_the_default_falls_back_and_an_explicit_request_is_refused(
        tmp_path, micro_transformer_dir, monkeypatch, capsys):
    """Where the model does not fit in memory (whole_model_dtype: None) the default conversion writes
    the weight-error file (the bytes of sensitivity=weights); sensitivity=gradient asked for is refused."""
    from zopt.platform import hardware

    weights = convert(micro_transformer_dir, "gguf:Q4_K_M", tmp_path / "weights.gguf",
                      options={"hash_source": False, "sensitivity": "weights"}, progress=False)
    monkeypatch.setattr(hardware, "whole_model_dtype", lambda params, device="cpu": (None, 1 << 20))
    default = convert(micro_transformer_dir, "gguf:Q4_K_M", tmp_path / "default.gguf",
                      options={"hash_source": False}, progress=False)
    assert default.read_bytes() == weights.read_bytes()
    err = capsys.readouterr().err.strip().splitlines()  # said on stderr, terminal or not
    assert len(err) == 1 and "does not fit in memory" in err[0] and "sensitivity=weights" in err[0], err
    out = tmp_path / "x.gguf"
    assert main(["convert", str(micro_transformer_dir), "--to", "gguf:Q4_K_M", "--option", "sensitivity=gradient",
                 "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "in memory" in err[0] and "sensitivity=weights" in err[0] and not out.exists(), err


def test_linears_the_calls_do_not_reach_take_the_median_gain(tmp_path, micro_transformer_dir):
    """A Z-Image-Omni checkpoint's siglip Linears see no input in text-to-image calls: the default
    conversion gives them the median gain of the others (recorded as unreached) instead of failing."""
    import json

    from safetensors.torch import save_file

    from zopt.families import zimage

    src = checkpoint.open(micro_transformer_dir)
    tensors = {n: src.get(n).contiguous().clone() for n in src.names()}
    config = {**dict(zimage.check_shapes(src)), "siglip_feat_dim": 64}
    g = torch.Generator().manual_seed(1)
    for n, shape in zimage.expected_shapes(config).items():
        if n not in tensors:
            tensors[n] = (torch.randn(*shape, generator=g) * 0.05 if len(shape) > 1 else torch.ones(*shape)).bfloat16()
    omni = tmp_path / "omni.safetensors"
    save_file(tensors, str(omni))
    out = convert(omni, "gguf:Q4_K_M", tmp_path / "omni.gguf", options={"hash_source": False}, progress=False)
    d = json.loads(checkpoint.open(out).metadata["zopt.sensitivity.calls.description"])
    assert d["measured_types"] == "gradient" and d["unreached"] > 0 and d["dtype"] == "float32"
