"""zopt publish / verify: folder layout, measured card, checksums, links, upload boundary."""

from __future__ import annotations

import json
import os

import pytest

from zopt.cli import main
from zopt.errors import ChecksumMismatch, ZoptError


@pytest.fixture(scope="module")
def variants(tmp_path_factory, tiny_original_file):
    import zopt

    d = tmp_path_factory.mktemp("variants")
    out = []
    for spec in ("bf16", "fp16"):
        out.append(zopt.convert(tiny_original_file, spec, d / f"tiny-{spec}", progress=False))
    return out


def _record(spec, sha, psnr, step_ms, peak):
    """A schema-valid bench record made by the harness's own record code."""
    from bench_helpers import record

    from zopt.bench.schema import validate

    rec = record(spec, psnr=psnr, step_ms=step_ms, peak=peak)
    rec["source"]["sha256"] = sha
    assert validate(rec) == []
    return rec


def test_publish_card_matches_records_and_verify(tmp_path, variants):
    from zopt.publish import CARD_METRICS, _get, assemble, describe_variant, verify

    sha = describe_variant(variants[0]).source_sha256
    records = [_record("bf16", sha, 48.25, 12.5, 300 << 20), _record("fp16", sha, 39.5, 11.0, 200 << 20),
               _record("fp16", "someothersource", 1.0, 1.0, 1)]
    repo = assemble(variants, tmp_path / "repo", repo_id="me/tiny-zimage-quants", records=records)
    card = (repo / "README.md").read_text()
    assert card.startswith("---\n") and "base_model_relation: quantized" in card
    assert "pipeline_tag: text-to-image" in card and "license: apache-2.0" in card
    for rec in records[:2]:
        spec = rec["format"]["spec"]
        row = next(ln for ln in card.splitlines() if ln.startswith(f"| `tiny-{spec}`"))
        for _, path, fmt in CARD_METRICS:
            assert f"| {fmt(_get(rec, path))} |" in row, (spec, path, row)
    # the command recorded at conversion time, as given
    from zopt.formats.artifact import read_manifest

    cmd = read_manifest(variants[0])["command"]
    assert cmd.startswith("zopt convert ") and cmd.endswith("tiny-original.safetensors --to bf16")
    assert f"`{cmd}`" in card
    # layout: artifact folders as subfolders with their config and manifest; everything checksummed
    assert (repo / "tiny-bf16" / "config.json").exists() and (repo / "tiny-fp16" / "zopt-manifest.json").exists()
    manifest = json.loads((repo / "zopt-publish.json").read_text())
    assert set(manifest["files"]) >= {"README.md", "tiny-bf16/diffusion_pytorch_model.safetensors"}
    verify(repo)
    assert main(["verify", str(repo)]) == 0
    # hard links, not copies, on the same filesystem
    src_w = variants[0] / "diffusion_pytorch_model.safetensors"
    assert os.stat(src_w).st_ino == os.stat(repo / "tiny-bf16" / "diffusion_pytorch_model.safetensors").st_ino


def test_verify_rejects_one_changed_byte(tmp_path, variants):
    from zopt.publish import assemble

    repo = assemble(variants, tmp_path / "repo", mode="copy")
    w = repo / "tiny-fp16" / "diffusion_pytorch_model.safetensors"
    data = bytearray(w.read_bytes())
    data[len(data) // 2] ^= 0x01
    w.write_bytes(bytes(data))
    with pytest.raises(ChecksumMismatch, match="tiny-fp16"):
        from zopt.publish import verify

        verify(repo, load=False)
    assert main(["verify", str(repo), "--no-load"]) == 2
    # the source variant was copied, so it is untouched
    assert (variants[1] / "diffusion_pytorch_model.safetensors").read_bytes() != bytes(data)


def test_publish_refuses_nonempty_output_and_leaves_it(tmp_path, variants):
    out = tmp_path / "repo"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["publish", str(variants[0]), "-o", str(out)]) == 2
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_push_without_token_fails_fast_and_keeps_folder(tmp_path, variants, monkeypatch):
    from zopt.publish import assemble, push

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hfhome"))
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    repo = assemble(variants[:1], tmp_path / "repo")
    before = sorted(p.name for p in repo.rglob("*"))
    with pytest.raises(ZoptError, match="no Hugging Face token"):
        push(repo, "me/x")
    assert sorted(p.name for p in repo.rglob("*")) == before


class _RecordingHub:
    """Stands in for huggingface_hub.HfApi at the network boundary: records the calls zopt makes."""

    def __init__(self):
        self.calls = []

    def create_repo(self, repo_id, **kw):
        self.calls.append(("create_repo", repo_id, kw))

    def create_branch(self, repo_id, **kw):
        self.calls.append(("create_branch", repo_id, kw))

    def upload_folder(self, **kw):
        self.calls.append(("upload_folder", kw["repo_id"], kw))

    def upload_large_folder(self, **kw):
        self.calls.append(("upload_large_folder", kw["repo_id"], kw))


def test_push_calls_up_to_the_upload(tmp_path, variants):
    from zopt.publish import assemble, push

    repo = assemble(variants, tmp_path / "repo")
    hub = _RecordingHub()
    assert push(repo, "me/x", private=True, revision="v1", token="t", api=hub) == "me/x@v1"
    names = [c[0] for c in hub.calls]
    assert names == ["create_repo", "create_branch", "upload_folder"]
    assert hub.calls[0][2]["private"] is True
    up = hub.calls[2][2]
    assert up["folder_path"] == str(repo) and up["revision"] == "v1"
    # a tampered folder is never uploaded
    (repo / "README.md").write_text("changed")
    hub2 = _RecordingHub()
    with pytest.raises(ChecksumMismatch):
        push(repo, "me/x", token="t", api=hub2)
    assert hub2.calls == []


def test_records_match_by_format_type_and_source():
    from bench_helpers import record

    from zopt.publish import Variant, match_records

    def variant(name, fmt, sub, sha="s1"):
        return Variant(name, "file", fmt, sub, f"{fmt}:{sub}" if sub else fmt, 1, 1, 8.0, sha, None, None, "")

    recs = [record("gguf:Q8_0"), record("gguf:Q4_K_M"), record("fp8"), record("fp8", status="failed")]
    for r in recs:
        r["source"]["sha256"] = "s1"
    got = match_records([variant("a.gguf", "gguf", "Q4_K_M"), variant("b", "fp8", "e4m3"),
                         variant("c.gguf", "gguf", "Q6_K"), variant("d", "fp8", None, sha="s2")], recs)
    assert got["a.gguf"] is recs[1] and got["b"] is recs[2]
    assert "c.gguf" not in got and "d" not in got


def test_card_marks_noisy_latency(variants):
    """A step latency whose p90 is far above its median is published as noisy, not as a plain figure."""
    from zopt.bench.display import NOISY_SPREAD
    from zopt.card import variant_rows
    from zopt.publish import describe_variant, match_records

    described = [describe_variant(v) for v in variants]
    sha = described[0].source_sha256
    steady, noisy = _record("bf16", sha, 48.25, 12.5, 300 << 20), _record("fp16", sha, 39.5, 11.0, 200 << 20)
    noisy["metrics"]["latency"]["step_ms"]["p90"] = 11.0 * 3
    assert steady["metrics"]["latency"]["step_ms"]["p90"] / 12.5 <= NOISY_SPREAD < 3
    rows = {row[0]: " | ".join(row) for row in variant_rows(described, match_records(described, [steady, noisy]))}
    assert "| 11.0 (noisy: p90 3.0x median) |" in rows["`tiny-fp16`"]
    assert "| 12.5 |" in rows["`tiny-bf16`"] and "noisy" not in rows["`tiny-bf16`"]


def test_card_is_a_hub_model_card_with_image_grid(tmp_path, variants):
    """The card parses with huggingface_hub's ModelCard (metadata as written); the bench images of
    the reference and each measured variant are in the folder, checksummed, and shown in the card."""
    from bench_helpers import record
    from huggingface_hub import ModelCard
    from PIL import Image

    from zopt.publish import assemble, describe_variant, verify

    bench = tmp_path / "bench"
    (bench / "img").mkdir(parents=True)
    for i, name in enumerate(("ref.png", "bf16.png", "fp16.png")):
        Image.new("RGB", (512, 384), (40 * i, 80, 120)).save(bench / "img" / name)
    sha = describe_variant(variants[0]).source_sha256
    recs = [record("fp32", role="reference", psnr=None, bits=32, out=bench, images=["img/ref.png"]),
            record("bf16", out=bench, images=["img/bf16.png"]), record("fp16", out=bench, images=["img/fp16.png"])]
    for r in recs:
        r["source"]["sha256"] = sha
    repo = assemble(variants, tmp_path / "repo", records=recs, record_roots={id(r): bench for r in recs})
    card = ModelCard.load(repo / "README.md")
    assert card.data.library_name == "diffusers" and card.data.base_model_relation == "quantized"
    assert "zopt" in card.data.tags
    assert 'transformer=zopt.load(folder, device="cuda"' in card.text  # the documented one-liner
    grid = [ln for ln in card.text.splitlines() if ln.startswith("| a (seed 0)")]
    assert grid and all(f"](images/{n}-0.png)" in grid[0] for n in ("reference", "tiny-bf16", "tiny-fp16"))
    with Image.open(repo / "images" / "tiny-fp16-0.png") as im:
        assert im.size == (256, 192) and im.getpixel((5, 5)) == (80, 80, 120)
    assert "images/tiny-fp16-0.png" in json.loads((repo / "zopt-publish.json").read_text())["files"]
    verify(repo, load=False)


def test_card_library_is_zopt_when_diffusers_cannot_read_a_variant(tmp_path, tiny_transformer_dir):
    import zopt
    from zopt.card import card_data
    from zopt.publish import describe_variant

    fp8 = describe_variant(zopt.convert(tiny_transformer_dir, "fp8", tmp_path / "tiny-fp8", progress=False))
    assert card_data([fp8], None, "Tongyi-MAI/Z-Image-Turbo").library_name == "zopt"


def test_hub_sources_are_recorded_with_their_revision(tmp_path):
    from zopt.checkpoint import hub_id_of, pinned_hub_id

    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = tmp_path / "hub" / "models--Tongyi-MAI--Z-Image-Turbo" / "snapshots" / commit / "transformer"
    assert hub_id_of(snap) == f"Tongyi-MAI/Z-Image-Turbo@{commit}"
    assert pinned_hub_id("Tongyi-MAI/Z-Image-Turbo", snap) == f"Tongyi-MAI/Z-Image-Turbo@{commit}"
    assert pinned_hub_id("Tongyi-MAI/Z-Image-Turbo@v1", snap) == "Tongyi-MAI/Z-Image-Turbo@v1"
    assert pinned_hub_id("./local", tmp_path) == "./local" and hub_id_of(tmp_path) is None


def test_gguf_of_a_builtin_source_records_a_runnable_command(tmp_path):
    """A GGUF made from ``tiny`` names ``tiny`` (not the cache folder) in its reproducing command."""
    import zopt
    from zopt.publish import describe_variant

    out = zopt.convert("tiny", "gguf:Q8_0", tmp_path / "t.gguf", progress=False)
    v = describe_variant(out)
    assert v.source_name == "tiny" and v.command == "zopt convert tiny --to gguf:Q8_0"
