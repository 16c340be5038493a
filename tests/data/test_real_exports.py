"""Exports as real annotation tools write them (issue 15, items 1, 2, 3, 5).

Each sample is small but laid out as the tool lays it out: a CVAT *project* export with
subsets, an Open Images download given file by file, a COCO file from CVAT/datumaro that
writes `categories` first, Open Images images stored per Subset next to the standard
companion CSVs. Every test goes through `ingest`, the door the CLI and the DAG use.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from odapi_operators.core.data import formats
from odapi_operators.core.data.ingest import SNIFF_BYTES, ingest
from odapi_operators.core.data.manifest import read_manifest
from odapi_operators.core.rejections import StageError


def jpeg(path: Path, size: tuple[int, int], colour=(30, 120, 200)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, "JPEG")
    return path


def records(out: Path) -> dict:
    return {r.key: r for r in read_manifest(out / "manifest.jsonl")}


def rejections(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "rejections.jsonl").read_text().splitlines()]


def boxes(record) -> list[tuple]:
    return sorted((b.label, round(b.xmin, 6), round(b.ymin, 6), round(b.xmax, 6),
                   round(b.ymax, 6)) for b in record.boxes)


# -- 3. COCO from CVAT / datumaro: categories before images -------------------------------------

def coco_categories_first(classes: int) -> dict:
    """The key order datumaro (and CVAT, which exports COCO through it) writes."""
    return {
        "licenses": [{"name": "", "id": 0, "url": ""}],
        "info": {"contributor": "", "date_created": "", "description": "", "url": "",
                 "version": "", "year": ""},
        "categories": [{"id": i, "name": f"class_{i:03d}", "supercategory": ""}
                       for i in range(1, classes + 1)],
        "images": [{"id": 1, "width": 200, "height": 100, "file_name": "frame_000001.jpg",
                    "license": 0, "flickr_url": "", "coco_url": "", "date_captured": 0}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 85, "segmentation": [],
                         "area": 1000.0, "bbox": [20.0, 10.0, 50.0, 20.0], "iscrowd": 0,
                         "attributes": {"occluded": False, "rotation": 0.0}}],
    }


@pytest.mark.parametrize("classes", [90, 600])
def test_coco_with_categories_first_is_detected(tmp_path, classes):
    export = tmp_path / "coco"
    jpeg(export / "images" / "frame_000001.jpg", (200, 100))
    path = export / "annotations" / "instances_default.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(coco_categories_first(classes)))
    assert b'"images"' not in path.read_bytes()[:SNIFF_BYTES]
    summary = ingest([str(export / "annotations")], tmp_path / "out",
                     images_root=str(export / "images"))
    [record] = records(tmp_path / "out").values()
    assert summary["rejected"] == 0
    assert boxes(record) == [("class_085", 0.1, 0.1, 0.35, 0.3)]


def test_other_json_objects_are_not_taken_for_coco(tmp_path):
    """A JSON object that does not open with a COCO key is not claimed, however long; one
    that does is claimed, and a file without images is then reported as such."""
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({"project": "x", "categories": ["a" * 50] * 200,
                                    "images": "later"}))
    cats = tmp_path / "label_schema.json"
    cats.write_text(json.dumps({"name": "x", "categories": [{"id": i, "name": f"c{i}"}
                                                            for i in range(500)]}))
    for path in (settings, cats):
        assert formats.detect(path, path.read_bytes()[:SNIFF_BYTES]) is None, path.name
    only_categories = tmp_path / "categories.json"
    only_categories.write_text(json.dumps({"categories": coco_categories_first(200)
                                           ["categories"]}))
    head = only_categories.read_bytes()[:SNIFF_BYTES]
    assert formats.detect(only_categories, head) == "coco"
    with pytest.raises(StageError, match="no usable records"):
        ingest([str(only_categories)], tmp_path / "out")
    assert [(r["record"], r["reason"]) for r in rejections(tmp_path / "out")] == [
        ("document", "not a COCO export: no images list")]
