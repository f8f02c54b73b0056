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
        """Both sides in turns; with ``against`` None (its conversion failed) this side alone."""
        if against is None:
            return run_worker(spec, work, name, timeout, on_event, log), None
        return run_paired(spec, against, work, name, timeout, on_event, log, self.out / "logs" / f"{name}.log",
                          self.root)

    def finish(self, rec: dict[str, Any]) -> None:
        from .harness import safe_name

        self.records.append(rec)
        (self.out / "records" / f"{safe_name(rec['label'])}.json").write_text(json.dumps(rec, indent=1) + "\n")

    def write(self) -> Path:
        doc = self.out / "results.json"
        doc.write_text(json.dumps(results_document(self.records), indent=1) + "\n")
        return doc
