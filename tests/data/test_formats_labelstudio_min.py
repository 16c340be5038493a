"""Label Studio JSON-MIN exports (issue #15, item 4), as label-studio-sdk's converter writes them.

`Converter.convert_to_json_min` writes one flat record per annotation that was not cancelled:
the task's data at the top level (`image`), `id`, `annotation_id`, `annotator`, timestamps,
`lead_time`, and one key per control tag holding its results' values (with
`original_width/height`, without `type`); a one-item Choices result is prettified to its
string; a task without annotations is a record whose `annotation_id` is null.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from odapi_operators.core.data.ingest import ingest
from odapi_operators.core.data.manifest import read_manifest


def jpeg(path: Path, width: int = 200, height: int = 100) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (width, height), (90, 140, 40)).save(path, "JPEG")


def box(x, y, w, h, label, rotation=0, width=200, height=100) -> dict:
    """A RectangleLabels value as JSON-MIN writes it: percent of the image, top-left."""
    return {"x": x, "y": y, "width": w, "height": h, "rotation": rotation,
            "rectanglelabels": [label], "original_width": width, "original_height": height}


def annotated(task_id, image, annotation_id, stamp, **tags) -> dict:
    return {"image": image, "id": task_id, **tags, "annotator": 1,
            "annotation_id": annotation_id, "created_at": stamp, "updated_at": stamp,
            "lead_time": 7.5}


@pytest.fixture
def json_min_export(tmp_path) -> Path:
    """Six tasks of one project: uploads and local storage, one task annotated twice, one
    unannotated, one negative, one with only a polygon, one with a choice beside its box."""
    export = tmp_path / "project-3-at-2024-05-01"
    for name in ("a", "b", "c", "d", "e", "f"):
        jpeg(export / f"{name}.jpg")
    records = [
        annotated(11, "/data/upload/3/1a2b3c4d-a.jpg", 101, "2024-05-01T10:00:00.000000Z",
                  label=[box(10, 20, 30, 40, "Butterfly")]),
        # task 12, annotated twice: the converter writes the newest first
        annotated(12, "/data/local-files/?d=b.jpg", 103, "2024-05-01T12:00:00.000000Z",
                  label=[box(50, 0, 50, 50, "Bee"), box(0, 50, 25, 50, "Butterfly")]),
        annotated(12, "/data/local-files/?d=b.jpg", 102, "2024-05-01T11:00:00.000000Z",
                  label=[box(0, 0, 10, 10, "Bee")]),
        {"image": "/data/upload/3/0badf00d-c.jpg", "id": 13, "annotator": None,
         "annotation_id": None, "created_at": None, "updated_at": None, "lead_time": None},
        annotated(14, "/data/upload/3/deadbeef-d.jpg", 104, "2024-05-01T13:00:00.000000Z"),
        annotated(15, "/data/upload/3/cafe0001-e.jpg", 105, "2024-05-01T14:00:00.000000Z",
                  label=[{"points": [[1, 1], [20, 5], [9, 30]], "polygonlabels": ["Bee"],
                          "closed": True, "original_width": 200, "original_height": 100}]),
        annotated(16, "/data/upload/3/cafe0002-f.jpg", 106, "2024-05-01T15:00:00.000000Z",
                  quality="sharp", label=[box(0, 0, 100, 100, "Bee")]),
    ]
    (export / "project-3-at-2024-05-01-json-min.json").write_text(json.dumps(records, indent=2))
    return export


def _boxes(out: Path) -> dict[str, list[tuple]]:
    return {r.key: [(b.label, round(b.xmin, 6), round(b.ymin, 6), round(b.xmax, 6),
                     round(b.ymax, 6)) for b in r.boxes]
            for r in read_manifest(out / "manifest.jsonl")}


def _rejections(out: Path) -> list[tuple[str, str]]:
    rows = [json.loads(line) for line in (out / "rejections.jsonl").read_text().splitlines()]
    return sorted((r["record"], r["reason"].split(":", 1)[0]) for r in rows)


@pytest.mark.parametrize("fmt", ["auto", "labelstudio"])
def test_json_min_export_gives_the_submitted_boxes(json_min_export, tmp_path, fmt):
    """Recognised without --format, read with it: the latest annotation's boxes, exactly.
    Before: auto found no annotation file, and --format labelstudio said "no image" for every
    record (it looked for data.image)."""
    out = tmp_path / "out"
    summary = ingest([str(json_min_export)], out, fmt=fmt)
    assert _boxes(out) == {
        "a": [("Butterfly", 0.1, 0.2, 0.4, 0.6)],
        "b": [("Bee", 0.5, 0.0, 1.0, 0.5), ("Butterfly", 0.0, 0.5, 0.25, 1.0)],  # id 103
        "d": [],  # annotated, nothing in it: a negative
        "f": [("Bee", 0.0, 0.0, 1.0, 1.0)],  # its `quality` choice is task-level
    }
    assert _rejections(out) == [
        ("task 12 annotation 102", "superseded annotation"),
        ("task 13", "unlabeled task"),
        ("task 15", "no usable box"),
        ("task 15 annotation 105 label[0]", "unsupported result type"),
    ]
    assert summary["images"] == 4 and summary["boxes"] == 4
    record = next(r for r in read_manifest(out / "manifest.jsonl") if r.key == "b")
    assert (record.width, record.height, record.source_id) == (200, 100, "12")
    assert record.provenance["annotation"] == 103 and record.provenance["layout"] == "json-min"


def test_json_min_bad_records_are_reported_and_the_good_ones_flow(tmp_path):
    """A record without an image, a box without labels and a box with non-numbers are each
    reported with file and record; the good task next to them is kept."""
    export = tmp_path / "export"
    jpeg(export / "good.jpg")
    jpeg(export / "nolabel.jpg")
    records = [
        annotated(1, "good.jpg", 11, "2024-05-01T10:00:00Z", label=[box(0, 0, 50, 50, "Bee")]),
        annotated(2, None, 12, "2024-05-01T10:00:00Z", label=[box(0, 0, 50, 50, "Bee")]),
        annotated(3, "nolabel.jpg", 13, "2024-05-01T10:00:00Z",
                  label=[{"x": 1, "y": 1, "width": 5, "height": 5, "original_width": 200,
                          "original_height": 100}, {**box(0, 0, 5, 5, "Bee"), "x": "left"}]),
    ]
    path = export / "export.json"
    path.write_text(json.dumps(records))
    out = tmp_path / "out"
    summary = ingest([str(export)], out)
    assert summary["images"] == 1 and _boxes(out) == {"good": [("Bee", 0.0, 0.0, 0.5, 0.5)]}
    rows = [json.loads(line) for line in (out / "rejections.jsonl").read_text().splitlines()]
    assert {r["file"] for r in rows} == {str(path)}
    assert sorted((r["record"], r["reason"].split(":", 1)[0]) for r in rows) == [
        ("task 2", "no image"),
        ("task 3", "no usable box"),
        ("task 3 annotation 13 label[0]", "bad result"),
        ("task 3 annotation 13 label[1]", "bad result"),
    ]


def test_json_min_image_under_another_data_key(tmp_path):
    """A labeling config with `<Image value="$photo"/>` puts the image under `photo`; with
    two image fields the record is ambiguous and reported, not guessed."""
    export = tmp_path / "export"
    jpeg(export / "p.jpg")
    records = [annotated(n, None, 10 + n, "2024-05-01T10:00:00Z",
                         label=[box(0, 0, 50, 50, "Bee")]) for n in (1, 2, 3)]
    for record in records:
        del record["image"]
    records[0].update(photo="/data/upload/9/0123abcd-p.jpg", caption="a bee on a flower")
    records[1].update(photo="p.jpg", thumb="p_small.jpg")
    records[2].update(source="http://[::1")  # not a URL urlsplit accepts: no crash
    (export / "export.json").write_text(json.dumps(records))
    out = tmp_path / "out"
    ingest([str(export)], out)
    assert _boxes(out) == {"p": [("Bee", 0.0, 0.0, 0.5, 0.5)]}
    assert _rejections(out) == [("task 2", "no image"), ("task 3", "no image")]
