"""The terminal table: fits 100 columns, one binary unit per column, noisy latency and small-model notes."""

from __future__ import annotations

from bench_helpers import record
from rich.console import Console

from zopt.bench.display import NOISY_SPREAD, columns, footnotes, is_noisy, need_bytes, print_table

FULL_PARAMS = 6_154_000_000
GIB = 2**30

# (label spec, backend, bits/weight, peak above baseline GiB, step ms) as a full-size GPU sweep reports them
FULL_SIZE_RUNS = [
    ("bf16", "torch", 16.0, 22.4, 1234.5), ("fp8", "scaled-mm", 8.2, 14.1, 812.3),
    ("fp8", "fp8-storage", 8.2, 14.3, 1301.9), ("gguf:Q8_0", "torch-dequant", 8.6, 14.9, 1402.2),
    ("gguf:Q5_K_M", "torch-dequant", 5.9, 12.2, 1511.0), ("gguf:Q4_K_M", "torch-dequant", 5.1, 11.3, 1529.7),
    ("int8", "torch-dequant", 8.3, 14.6, 1388.8), ("int8_w8a8", "int-mm-cuda", 8.3, 14.2, 702.4),
    ("int4", "torch-dequant", 4.6, 10.9, 1653.1), ("nf4", "bitsandbytes", 4.6, 10.8, 1702.6),
    ("onnx:fp16", "ort-tensorrt", 16.0, 25.7, 998.1),
]


def full_size_records() -> list[dict]:
    recs = [record("bf16", role="reference", psnr=None, bits=16.0, peak=int(23.0 * GIB), step_ms=1200.0)]
    for k, (spec, backend, bits, peak, ms) in enumerate(FULL_SIZE_RUNS):
        recs.append(record(spec, backend=backend, bits=bits, peak=int(peak * GIB), step_ms=ms,
                           psnr=60.0 - 3 * k, rel_l2=1e-3 * (k + 1)))
    recs.append(record("tensorrt", backend=None, status="missing_dependency"))
    recs.append(record("gguf:Q2_K", backend=None, status="unsupported"))
    recs.append(record("int8_w8a8", backend="int-mm-cpu", status="crashed"))
    for r in recs:
        r["source"]["params"] = FULL_PARAMS
        r["source"]["spec"] = "Tongyi-MAI/Z-Image-Turbo@main"
        if r["status"] == "ok":
            r["metrics"]["artifact_bytes"] = int(r["metrics"]["bits_per_weight"] * FULL_PARAMS / 8)
            r["metrics"]["memory"]["kind"] = "cuda"
            r["metrics"]["memory"]["baseline_bytes"] = 0
    recs[3]["metrics"]["latency"]["step_ms"]["p90"] = 1301.9 * 3.1  # fp8-storage: a noisy run
    recs[4]["metrics"]["quality"]["lpips"] = 0.0123  # LPIPS measured for one run
    return recs


def render(recs, wide=False) -> tuple[str, list[str]]:
    con = Console(record=True, width=400)  # far wider than needed: the table takes its natural width
    print_table(recs, con, wide=wide)
    text = con.export_text()
    lines = text.splitlines()
    table = lines[: next(i for i, ln in enumerate(lines) if ln.startswith("  Sizes"))]
    return text, table


def test_compact_table_fits_100_columns():
    recs = full_size_records()
    text, table = render(recs)
    assert max(len(ln.rstrip()) for ln in table) <= 100, max(len(ln.rstrip()) for ln in table)
    assert "…" not in text  # nothing was cut to fit
    row = next(ln for ln in table if "gguf:Q4_K_M@torch-dequant" in ln)
    size_gib = 5.1 * FULL_PARAMS / 8 / GIB
    for cell in (f"{size_gib:.2f}", "5.10", "11.30", "1529.7", "45.0"):  # size GiB, bits/w, peak GiB, ms, PSNR
        assert cell in row, (cell, row)
    header = "\n".join(table[:6])
    assert "GiB" in header and "MB" not in header  # one binary unit, named in the header
    assert "~1301.9" in next(ln for ln in table if "fp8@fp8-storage" in ln)  # the noisy median is marked
    assert "LPIPS" in header  # measured for one run, so shown
    # every run is listed, the failed ones with their full status after the table
    for r in recs:
        assert r["label"] in text
    assert "tensorrt: missing_dependency — something went wrong" in text


def test_wide_table_has_every_column():
    recs = full_size_records()
    _, compact = render(recs)
    _, wide = render(recs, wide=True)
    assert len(columns(recs, wide=True)) > len(columns(recs))
    assert max(map(len, wide)) > 100
    assert "missing_dependency" in "\n".join(wide) and "p90" in "\n".join(wide)
    row = next(ln for ln in wide if "fp8@fp8-storage" in ln)
    assert f"{1301.9 * 3.1:.1f}" in row  # the p90 column


def test_noisy_latency_footnote_names_the_run():
    recs = full_size_records()
    noisy = [r["label"] for r in recs if is_noisy(r)]
    assert noisy == ["fp8@fp8-storage"]  # the other runs have p90 = 1.2 x median, below the threshold
    assert 1.2 < NOISY_SPREAD < 3.1
    notes = footnotes(recs)
    assert any("fp8@fp8-storage 3.1x" in n for n in notes)
    assert not any("Test-sized" in n for n in notes)  # a full-size source has no small-model caveat


def test_small_model_caveat_and_total_memory():
    rec = record("gguf:Q4_K_M", backend="torch-dequant", bits=8.37, peak=185_000_000)
    assert need_bytes(rec) == 185_000_000 + rec["metrics"]["memory"]["baseline_bytes"]  # what the run needed
    notes = footnotes([rec])
    assert any("Test-sized model (9.0M-parameter)" in n and "bits/w" in n for n in notes)
    _, table = render([rec])
    assert "MiB" in "\n".join(table[:6])


def test_cli_table_on_a_pipe(tmp_path, capsys):
    """`zopt bench --results` on a pipe: the compact table in 100 columns, `--wide` adds the other columns."""
    import json

    from zopt.bench.schema import results_document
    from zopt.cli import main

    results = tmp_path / "results.json"
    results.write_text(json.dumps(results_document(full_size_records())))
    assert main(["bench", "--results", str(results), "--no-report"]) == 0
    compact = capsys.readouterr().out
    assert max(map(len, compact.splitlines())) <= 100 and "…" not in compact
    assert "gguf:Q4_K_M@torch-dequant" in compact and "p90" not in compact.split("Sizes and memory")[0]
    assert main(["bench", "--results", str(results), "--no-report", "--wide"]) == 0
    wide = capsys.readouterr().out
    assert "p90" in wide and "missing_dependency" in wide and "…" not in wide
