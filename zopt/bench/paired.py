"""The baseline side of a paired sweep (``zopt bench --against DIR``).

Every run of the sweep also runs with the zopt package found in DIR (a checkout of the baseline
commit), side by side: both processes load, then take images in turns (:func:`.process.run_paired`),
so both are timed under the same machine load. The baseline side converts with its own code into
the sweep's scratch folder (nothing cached: the conversion code may be what changed) and keeps its
own reference, images, logs and records under ``OUT/baseline``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from .process import run_paired, run_worker
from .schema import results_document


class Against:
    """Where the baseline side's code, scratch files and records live."""

    def __init__(self, root: str | os.PathLike, out: Path, work: Path):
        from ..errors import ZoptError

        self.root = str(Path(root).resolve())
        if not (Path(self.root) / "zopt" / "__init__.py").is_file():
            raise ZoptError(f"--against {root}: no zopt package in this folder (give a checkout of the baseline)")
        self.out, self.work = out, work / "against"
        self.records: list[dict[str, Any]] = []
        self.ref_images: list[str] = []
        shutil.rmtree(out / "records", ignore_errors=True)
        (out / "records").mkdir(parents=True, exist_ok=True)

    def spec(self, spec: dict[str, Any], name: str, model: str | None = None) -> dict[str, Any]:
        """``spec`` as the baseline side runs it: its own model, reference captures and images."""
        images = self.out / "images" / name
        shutil.rmtree(images, ignore_errors=True)
        extra = {"ref_images": self.ref_images} if spec.get("role") == "variant" else {}
        return dict(spec, ref_dir=str(self.work / "reference"), image_dir=str(images),
                    model=model or spec["model"], **extra)

    def convert(self, spec: dict[str, Any], name: str, timeout: float) -> tuple[Path, dict[str, Any]]:
        """Convert with the baseline's code; returns (artifact path, the worker's result)."""
        artifact = self.work / "artifacts" / Path(spec["out"]).name
        res = run_worker(dict(spec, out=str(artifact)), self.work, f"{name}.convert", timeout,
                         log_path=self.out / "logs" / f"{name}.convert.log", root=self.root)
        return artifact, res

    def run(self, spec: dict[str, Any], against: dict[str, Any] | None, work: Path, name: str, timeout: float,
            on_event, log: Path) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """Both sides in turns; with ``against`` None (its conversion failed) this side alone, with
        ``spec`` None (this side's conversion failed) the baseline alone."""
        if against is None:
            return (run_worker(spec, work, name, timeout, on_event, log) if spec else None), None
        if spec is None:
            return None, run_worker(against, work, name + ".against", timeout, log_path=self.out / "logs" / f"{name}.log",
                                    root=self.root)
        return run_paired(spec, against, work, name, timeout, on_event, log, self.out / "logs" / f"{name}.log",
                          self.root)

    def variant(self, cfg, common: dict[str, Any], row, spec: dict[str, Any], artifact: Path,
                metrics: dict[str, Any], work: Path, on_event, log: Path, converted: bool = True
                ) -> dict[str, Any] | None:
        """One variant on both sides: the baseline converts with its own code, then both run in
        turns; keeps the baseline's record and returns this side's result (``converted`` False:
        this side's conversion failed, the baseline runs alone)."""
        from .harness import _record, safe_name
        from .metrics import artifact_bytes, bits_per_weight

        name = safe_name(row.label)
        conv = {"mode": "convert", "source": str(cfg.source), "to": row.spec, "out": str(artifact),
                "options": cfg.options}
        artifact_b, conv_b = self.convert(conv, name, cfg.timeout)
        ok = conv_b["status"] == "ok" and artifact_b.exists()
        res, res_b = self.run(spec if converted else None, self.spec(spec, name, str(artifact_b)) if ok else None,
                              work, name, cfg.timeout, on_event, log)
        if not ok:
            res_b = dict(conv_b, status="failed" if conv_b["status"] == "ok" else conv_b["status"], metrics={},
                         message=f"conversion failed: {conv_b.get('message') or 'no artifact written'}")
        metrics_b = dict(metrics, cached=False, convert_s=(conv_b.get("metrics") or {}).get("convert_s"))
        if ok:
            metrics_b["artifact_bytes"] = artifact_bytes(artifact_b)
            metrics_b["bits_per_weight"] = bits_per_weight(metrics_b["artifact_bytes"], common["source"]["params"])
        self.finish(_record(common, row, "variant", res_b, metrics_b, None, self.out))
        return res

    def finish(self, rec: dict[str, Any]) -> None:
        from .harness import safe_name

        self.records.append(rec)
        (self.out / "records" / f"{safe_name(rec['label'])}.json").write_text(json.dumps(rec, indent=1) + "\n")

    def write(self) -> Path:
        doc = self.out / "results.json"
        doc.write_text(json.dumps(results_document(self.records), indent=1) + "\n")
        return doc
