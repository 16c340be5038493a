"""One policy for group boxes (issue #15, item 6): COCO `iscrowd` and Open Images `IsGroupOf`.

The same scene in both formats: image A has one person and one box around a crowd, image B
only a crowd box. `exports.group_boxes: skip` (the default) leaves both crowd boxes out,
reported, and drops B; `keep` keeps them as ordinary boxes, counted in the summary. Before,
COCO skipped them and Open Images silently kept them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from odapi_operators.core.config import ExportsConfig
from odapi_operators.core.data.ingest import ingest
from odapi_operators.core.data.manifest import read_manifest
from odapi_operators.core.failures import Failure
from odapi_operators.core.rejections import StageError

PERSON = ("person", 0.1, 0.2, 0.3, 0.6)
CROWD = ("person", 0.4, 0.1, 0.9, 0.9)


def jpeg(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (200, 100), (30, 60, 90)).save(path, "JPEG")


def coco_export(folder: Path) -> Path:
    """As CVAT or datumaro write it: `categories` first, a crowd region with `iscrowd: 1`."""
    def bbox(box):
        return [box[1] * 200, box[2] * 100, (box[3] - box[1]) * 200, (box[4] - box[2]) * 100]
    for name in ("A", "B"):
        jpeg(folder / f"{name}.jpg")
    doc = {"categories": [{"id": 1, "name": "person", "supercategory": ""}],
           "images": [{"id": 1, "file_name": "A.jpg", "width": 200, "height": 100},
                      {"id": 2, "file_name": "B.jpg", "width": 200, "height": 100}],
           "annotations": [
               {"id": 1, "image_id": 1, "category_id": 1, "bbox": bbox(PERSON), "iscrowd": 0},
               {"id": 2, "image_id": 1, "category_id": 1, "bbox": bbox(CROWD), "iscrowd": 1},
               {"id": 3, "image_id": 2, "category_id": 1, "bbox": bbox(CROWD), "iscrowd": 1}]}
    (folder / "instances_default.json").write_text(json.dumps(doc))
    return folder


def openimages_export(folder: Path) -> Path:
    """A boxes CSV with Open Images' full header and a class descriptions CSV."""
    for name in ("A", "B"):
        jpeg(folder / f"{name}.jpg")
    header = ("ImageID,Source,LabelName,Confidence,XMin,XMax,YMin,YMax,IsOccluded,"
              "IsTruncated,IsGroupOf,IsDepiction,IsInside")

    def row(image, box, group):
        _, x0, y0, x1, y1 = box
        return f"{image},xclick,/m/01g317,1,{x0},{x1},{y0},{y1},0,0,{group},0,0"
    lines = [header, row("A", PERSON, 0), row("A", CROWD, 1), row("B", CROWD, 1)]
    (folder / "oidv6-train-annotations-bbox.csv").write_text("\n".join(lines) + "\n")
    (folder / "class-descriptions-boxable.csv").write_text("/m/01g317,person\n")
    return folder


EXPORTS = {"coco": coco_export, "openimages": openimages_export}


def _boxes(out: Path) -> dict[str, list[tuple]]:
    return {r.key: [(b.label, round(b.xmin, 6), round(b.ymin, 6), round(b.xmax, 6),
                     round(b.ymax, 6)) for b in r.boxes]
            for r in read_manifest(out / "manifest.jsonl")}


def _reasons(out: Path) -> list[str]:
    return [json.loads(line)["reason"]
            for line in (out / "rejections.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("fmt", sorted(EXPORTS))
def test_group_boxes_are_skipped_by_default_and_reported(tmp_path, fmt):
    """Default skip, the same in both formats: A keeps its one person, B (only a crowd) is
    dropped; every skipped box is in the rejections and the summary, none in the budget."""
    export = EXPORTS[fmt](tmp_path / "export")
    out = tmp_path / "out"
    summary = ingest([str(export)], out, max_rejected_share=0.0)
    assert _boxes(out) == {"A": [PERSON]}
    reasons = _reasons(out)
    assert all(r.startswith("group box: ") for r in reasons) and len(reasons) >= 2
    assert any("image dropped, all 1 boxes are group boxes" in r for r in reasons)
    assert any("exports.group_boxes: keep" in r for r in reasons)  # how to keep them
    assert summary["group_boxes"] == {"policy": "skip", "kept": 0, "skipped": 2}
    assert summary["rejected_counted"] == 0  # a choice, not a defect of the export


@pytest.mark.parametrize("fmt", sorted(EXPORTS))
def test_group_boxes_kept_when_configured_and_counted(tmp_path, fmt):
    export = EXPORTS[fmt](tmp_path / "export")
    out = tmp_path / "out"
    summary = ingest([str(export)], out, options={"group_boxes": "keep"})
    assert _boxes(out) == {"A": [PERSON, CROWD], "B": [CROWD]}
    assert summary["rejected"] == 0
    assert summary["group_boxes"] == {"policy": "keep", "kept": 2, "skipped": 0}


def test_unknown_group_box_policy_is_a_config_error(tmp_path):
    export = coco_export(tmp_path / "export")
    with pytest.raises(StageError, match="exports.group_boxes must be one of skip, keep") as info:
        ingest([str(export)], tmp_path / "out", options={"group_boxes": "merge"})
    assert info.value.failure == Failure.CONFIG


def test_group_boxes_is_a_config_key_and_an_ingest_flag(tmp_path):
    """The option reaches the parsers from the config (default skip) and from the command
    line: `odapi ingest --group-boxes keep` in a real child process."""
    assert ExportsConfig(path="x").group_boxes == "skip"
    assert ExportsConfig(path="x", group_boxes="keep").parser_options()["group_boxes"] == "keep"
    export = openimages_export(tmp_path / "export")
    command = [sys.executable, "-m", "odapi_operators", "ingest", str(export)]
    kept = subprocess.run([*command, "--out", str(tmp_path / "a"), "--group-boxes", "keep"],
                          capture_output=True, text=True, timeout=120)
    assert kept.returncode == 0, kept.stderr
    assert json.loads(kept.stdout)["group_boxes"] == {"policy": "keep", "kept": 2, "skipped": 0}
    assert "2 kept, 0 skipped (--group-boxes keep)" in kept.stderr
    skipped = subprocess.run([*command, "--out", str(tmp_path / "b")], capture_output=True,
                             text=True, timeout=120)
    assert skipped.returncode == 0, skipped.stderr
    rows = (tmp_path / "b" / "rejections.jsonl").read_text()
    assert "--group-boxes keep" in rows and "exports.group_boxes" not in rows
