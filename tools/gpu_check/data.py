"""The check's datasets, made with the project's own `facediff prepare` commands (as the tests make them), each
once, when a row first needs it: the data row prepares the tiny rows' sets, a dry-run row its production size."""

from __future__ import annotations

import json
from pathlib import Path

from tools.gpu_check.plan import Dataset, Sizes, datasets
from tools.gpu_check.steps import FACEDIFF, Row, Runner

PREPARE_TIMEOUT_S = 180


class Datasets:
    def __init__(self, r: Runner, s: Sizes, cpu: bool, work: Path):
        self.r, self.work, self.specs = r, work, datasets(s, cpu)
        self.raw_done: set[str] = set()
        self.ready: dict[str, Path] = {}
        self.failed: set[str] = set()

    def get(self, name: str, row: Row) -> Path | None:
        """The shards of dataset `name`, prepared now if no row has yet (the steps go to `row`'s log); None when
        preparing failed or the budget is spent (the row says which)."""
        if name in self.ready:
            return self.ready[name]
        if name in self.failed:
            row.fail(f"not run: dataset {name} failed to prepare (see the row that first asked for it)")
            return None
        spec = self.specs[name]
        out = self.work / name
        if self._raw(spec, row) and self._shards(spec, out, row) == 0:
            manifest = out / "manifest.json"
            if manifest.exists():
                counts = json.loads(manifest.read_text()).get("counts", {})
                row.details.append(f"{name}: {spec.n} {spec.kind} at {spec.size} px -> {counts}")
                self.ready[name] = out
                return out
            row.fail(f"no {manifest}")
        if row.status == "FAIL":
            self.failed.add(name)
        return None

    def _raw(self, spec: Dataset, row: Row) -> bool:
        if spec.raw in self.raw_done:
            return True
        raw = str(self.work / spec.raw)
        if spec.kind == "faces":
            cmd = [*FACEDIFF, "prepare", "synthetic", raw, "--n", str(spec.n), "--size", str(spec.raw_size)]
        else:  # people scenes with captions; a quarter in val2017 (the ControlNet evaluates on val)
            cmd = [*FACEDIFF, "prepare", "synthetic-coco", raw, "--n", str(spec.n), "--size", str(spec.raw_size),
                   "--val-fraction", "0.25"]
        if self.r.run(row, f"prepare {spec.raw}", cmd, PREPARE_TIMEOUT_S) != 0:
            return False
        self.raw_done.add(spec.raw)
        return True

    def _shards(self, spec: Dataset, out: Path, row: Row) -> int | None:
        raw = str(self.work / spec.raw)
        if spec.kind == "faces":
            test = ["--test-size", str(spec.test_size)] if spec.test_size else []
            cmd = [*FACEDIFF, "prepare", "celebamask", raw, str(out), "--image-size", str(spec.size), "--mask-size",
                   str(spec.size), *test]
        else:  # the scenes without a person large enough are left out
            cmd = [*FACEDIFF, "prepare", "coco", raw, str(out), "--image-size", str(spec.size)]
        return self.r.run(row, f"prepare {out.name}", cmd, PREPARE_TIMEOUT_S)


def row_data(row: Row, data: Datasets) -> Row:
    """The sets the training rows read (the faces; the people scenes of the ControlNet)."""
    for name in ("faces", "coco"):
        data.get(name, row)
    return row
