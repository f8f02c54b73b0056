"""Mixture recipes re-tuned by measurement (``allocation=measured``, the default) and the unit-
importance search (``search=weighted``, the default), each against its rule/reference twin."""

from __future__ import annotations

import json

import gguf
import pytest
import torch

from zopt import checkpoint
from zopt.families import zimage
from zopt.formats import convert
from zopt.formats.gguf import AUTO_TYPES_KEY, auto, plan_for
from zopt.formats.gguf import quants as gq
from zopt.formats.gguf.recipes import FLOAT_TYPES, PRECISION_ORDER, recipe, row_type


def _types(path) -> dict[str, str]:
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}


@pytest.fixture(scope="module")
def rule_file(tmp_path_factory, tiny_transformer_dir):
    out = tmp_path_factory.mktemp("rule") / "Q4_K_M-rule.gguf"
    return convert(tiny_transformer_dir, "gguf:Q4_K_M", out, options={"allocation": "rule"}, progress=False)


def test_rule_allocation_writes_the_recipe_plan_and_records_the_choice(rule_file, tiny_transformer_dir):
    _, plans = plan_for(checkpoint.open(tiny_transformer_dir), "Q4_K_M", {})
    assert _types(rule_file) == {p.name: p.qtype for p in plans}
    meta = checkpoint.open(rule_file).metadata
    assert AUTO_TYPES_KEY not in meta and json.loads(meta["zopt.options"]) == {"allocation": "rule"}


def test_measured_recipe_is_no_larger_keeps_the_base_floor_and_predicts_less_error(
        rule_file, tiny_gguf, tiny_transformer_dir):
    measured = tiny_gguf("Q4_K_M")
    assert measured.stat().st_size <= rule_file.stat().st_size
    rule, got = _types(rule_file), _types(measured)
    assert json.loads(checkpoint.open(measured).metadata[AUTO_TYPES_KEY]) == got
    assert got != rule  # the measurement moved bytes on this model
    view = zimage.as_original(checkpoint.open(tiny_transformer_dir))
    base = recipe("Q4_K_M").base
    pred = {"rule": 0.0, "measured": 0.0}
    for name, t in rule.items():
        if t in FLOAT_TYPES:
            assert got[name] == t, name  # the float tensors stay as the rule stores them
            continue
        w = view.get(name).float()
        floor = row_type(base, w.shape[-1])
        assert PRECISION_ORDER.index(got[name]) >= PRECISION_ORDER.index(floor), name
        err = auto.measure(name, w, torch.ones(w.shape[-1]), (t, got[name]), weigh=False).errors
        pred["rule"] += err[t]
        pred["measured"] += err[got[name]]
    assert pred["measured"] < pred["rule"], pred


@pytest.mark.parametrize("search", ["weighted", "reference"])
def test_search_option_picks_ggml_weighted_or_reference_quantizer(tmp_path, tiny_transformer_dir, search):
    out = convert(tiny_transformer_dir, "gguf:Q4_K", tmp_path / f"{search}.gguf", options={"search": search},
                  progress=False)
    view = zimage.as_original(checkpoint.open(tiny_transformer_dir))
    tensors = {t.name: t for t in gguf.GGUFReader(out).tensors}
    checked = 0
    for name, t in tensors.items():
        qtype = t.tensor_type.name
        if qtype not in ("Q4_K", "Q5_0"):  # Q4_K, and its fallback for rows that are no multiple of 256
            continue
        w = view.get(name)
        want = gq.quantize(w, qtype, torch.ones(w.shape[-1]) if search == "weighted" else None)
        assert t.data.tobytes() == want.numpy().tobytes(), name
        other = gq.quantize(w, qtype, None if search == "weighted" else torch.ones(w.shape[-1]))
        checked += other.numpy().tobytes() != want.numpy().tobytes()  # the two searches really differ
    assert checked >= 4


def test_cli_says_what_measurement_chose_and_refuses_a_bad_allocation(tmp_path, tiny_transformer_dir, capsys):
    from zopt.cli import main

    out = tmp_path / "m.gguf"
    assert main(["convert", str(tiny_transformer_dir), "--to", "gguf:Q4_K_M", "-o", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    types = list(json.loads(checkpoint.open(out).metadata[AUTO_TYPES_KEY]).values())
    assert "types chosen by measured sensitivity" in text
    assert all(f"{t}: {types.count(t)}" in text for t in set(types) - {"F32", "BF16"})
    assert "F32:" not in text
    uniform = tmp_path / "u.gguf"
    assert main(["convert", str(tiny_transformer_dir), "--to", "gguf:Q4_K", "-o", str(uniform), "--no-progress"]) == 0
    assert "measured" not in capsys.readouterr().out
    bad = tmp_path / "b.gguf"
    assert main(["convert", str(tiny_transformer_dir), "--to", "gguf:Q4_K_M", "--option", "allocation=best",
                 "-o", str(bad), "--no-progress"]) == 2
    assert not bad.exists() and "allocation" in capsys.readouterr().err


def test_options_recorded_only_where_they_shape_the_file(tmp_path, tiny_transformer_dir):
    opts = {"allocation": "rule", "search": "reference"}
    got = {}
    for t in ("Q8_0", "Q4_K", "Q4_K_M", "BF16"):
        out = convert(tiny_transformer_dir, f"gguf:{t}", tmp_path / f"{t}.gguf", options=opts, progress=False)
        got[t] = json.loads(checkpoint.open(out).metadata.get("zopt.options", "{}"))
    assert got == {"Q8_0": {}, "BF16": {}, "Q4_K": {"search": "reference"}, "Q4_K_M": opts}


@pytest.mark.parametrize("subtype", [r for r in ("Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M",
                                                 "Q5_K_S", "Q5_K_M", "Q4_0", "Q4_1", "Q5_0", "Q5_1")])
def test_every_measured_recipe_is_no_larger_than_its_rule(tmp_path, tiny_transformer_dir, tiny_gguf, subtype):
    assert recipe(subtype).measured
    rule = convert(tiny_transformer_dir, f"gguf:{subtype}", tmp_path / "r.gguf", options={"allocation": "rule"},
                   progress=False)
    got = _types(tiny_gguf(subtype))
    assert tiny_gguf(subtype).stat().st_size <= rule.stat().st_size
    if recipe(subtype).base in ("Q4_0", "Q4_1", "Q5_0", "Q5_1"):  # a 32-block recipe stays among them
        assert not any(t.endswith("_K") for t in got.values()), got


def test_multi_target_pass_reads_the_source_once_with_measured_recipes(tmp_path, tiny_transformer_dir):
    from zopt.formats.multi import convert_many

    targets = [("gguf:Q8_0", tmp_path / "a.gguf"), ("gguf:Q4_K_M", tmp_path / "b.gguf")]
    _, shared = convert_many(tiny_transformer_dir, targets, progress=False, budget=300_000)
    assert shared.rereads == 0
    assert _types(tmp_path / "b.gguf") == _types(convert(tiny_transformer_dir, "gguf:Q4_K_M", tmp_path / "c.gguf",
                                                         progress=False))


def test_measured_recipe_with_an_imatrix_uses_it_and_stays_within_the_rule(tmp_path, tiny_transformer_dir):
    import numpy as np

    from zopt.formats.imatrix import Imatrix, Stat, read, write

    view = zimage.as_original(checkpoint.open(tiny_transformer_dir))
    rng = np.random.default_rng(1)
    entries = {n: Stat(np.exp(1.5 * rng.standard_normal(view.info(n).shape[1])) * 100, 100.0,
                       np.ones(view.info(n).shape[1], np.float32))
               for n in view.names() if len(view.info(n).shape) == 2 and n.endswith(".weight")}
    path = write(Imatrix(entries, ["seeded"], 1, 1), tmp_path / "t.imatrix")
    opts = {"imatrix": str(path)}
    rule = convert(tiny_transformer_dir, "gguf:Q4_K_M", tmp_path / "r.gguf", options={**opts, "allocation": "rule"},
                   progress=False)
    got = convert(tiny_transformer_dir, "gguf:Q4_K_M", tmp_path / "m.gguf", options=opts, progress=False)
    assert got.stat().st_size <= rule.stat().st_size
    types = _types(got)
    assert json.loads(checkpoint.open(got).metadata[AUTO_TYPES_KEY]) == types and types != _types(rule)
    imat = read(path)
    checked = 0
    for t in gguf.GGUFReader(got).tensors:  # every quantized tensor with an entry: the imatrix's weighted search
        qtype = t.tensor_type.name
        if qtype in FLOAT_TYPES or qtype == "Q8_0" or qtype == "F32":
            continue
        w = view.get(t.name)
        imp = torch.from_numpy(imat.importance(t.name, w.shape[-1]))
        assert t.data.tobytes() == gq.quantize(w, qtype, imp).numpy().tobytes(), t.name
        checked += 1
    assert checked >= 4
