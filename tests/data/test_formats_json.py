"""COCO, Label Studio and Prodigy parsers: the same real boxes as the VOC sample, every rule.

The sample generator writes real JPEGs with VOC XMLs; the VOC ingest gives the true boxes,
which the tests write again as COCO / Label Studio / Prodigy exports and read back through
`ingest`, so a parser is checked against independent truth, not against itself.
"""

from __future__ import annotations

import base64
import io
import json
import tracemalloc
from pathlib import Path

import pytest
from PIL import Image

from odapi_operators.core.data import formats, sample_data
from odapi_operators.core.data.formats import ParseContext, coco, labelstudio, prodigy
from odapi_operators.core.data.ingest import SNIFF_BYTES, ingest
from odapi_operators.core.data.manifest import ImageSource, key_from_url, read_manifest
from odapi_operators.core.rejections import RejectionLog

CATEGORIES = {name: index for index, name in enumerate(sample_data.CLASSES, start=1)}


# ---------------------------------------------------------------- helpers

def manifest(out: Path) -> dict:
    return {r.key: r for r in read_manifest(out / "manifest.jsonl")}


def rejections(out: Path) -> list[tuple[str, str, str]]:
    """(file name, record, short reason) of every rejection, sorted."""
    rows = [json.loads(line) for line in (out / "rejections.jsonl").read_text().splitlines()]
    return sorted((Path(r["file"]).name, r["record"], r["reason"].split(":", 1)[0])
                  for r in rows)


def reasons(out: Path) -> dict[str, str]:
    rows = [json.loads(line) for line in (out / "rejections.jsonl").read_text().splitlines()]
    return {r["record"]: r["reason"] for r in rows}


def jpeg(path: Path, width: int = 100, height: int = 80) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (width, height), (200, 40, 40)).save(path, "JPEG")
    return path


def write_json(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))
    return path


def write_jsonl(path: Path, lines: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines))
    return path


def pixels(record) -> list[tuple[str, int, int, int, int]]:
    """The VOC record's boxes back in integer pixels (the generator's exact values)."""
    return [(b.label, round(b.xmin * record.width), round(b.ymin * record.height),
             round(b.xmax * record.width), round(b.ymax * record.height)) for b in record.boxes]


def assert_same_boxes(got, want) -> None:
    assert [b.label for b in got] == [b.label for b in want]
    for g, w in zip(got, want):
        assert (g.xmin, g.ymin, g.xmax, g.ymax) == pytest.approx(
            (w.xmin, w.ymin, w.xmax, w.ymax), abs=1e-6)


def context(tmp: Path, images_root: Path | None = None) -> ParseContext:
    return ParseContext(export_root=tmp, images_root=images_root, log=RejectionLog(),
                        inline_dir=tmp / "inline")


@pytest.fixture(scope="module")
def truth(tmp_path_factory):
    """(VOC export folder, {key: VOC record}) of 6 generated images."""
    export = tmp_path_factory.mktemp("voc")
    gen = sample_data.generate(export, count=6, seed=11)
    out = tmp_path_factory.mktemp("voc_ingest") / "ingest"
    summary = ingest([str(export)], out, fmt="voc")
    records = manifest(out)
    assert summary["images"] == 6 and summary["boxes"] == gen["boxes"] and summary["rejected"] == 0
    assert sum(len(r.boxes) for r in records.values()) >= 6  # enough boxes to mean something
    return export, records


def coco_doc(records: dict) -> dict:
    images, annotations = [], []
    for image_id, (key, record) in enumerate(sorted(records.items()), start=1):
        images.append({"id": image_id, "file_name": f"{key}.jpg", "width": record.width,
                       "height": record.height, "license": 1})
        for label, x0, y0, x1, y1 in pixels(record):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": CATEGORIES[label], "iscrowd": 0,
                                "bbox": [x0, y0, x1 - x0, y1 - y0],
                                "area": (x1 - x0) * (y1 - y0), "segmentation": []})
    return {"info": {"description": "shapes", "version": "1.0"}, "licenses": [{"id": 1}],
            "images": images, "annotations": annotations,
            "categories": [{"id": i, "name": n, "supercategory": "shape"}
                           for n, i in CATEGORIES.items()]}


def rect(x, y, w, h, label="cat", width=200, height=100, rotation=0, sized=True) -> dict:
    result = {"id": f"r{x}{y}", "type": "rectanglelabels", "from_name": "label",
              "to_name": "image", "origin": "manual",
              "value": {"x": x, "y": y, "width": w, "height": h, "rotation": rotation,
                        "rectanglelabels": [label]}}
    if sized:
        result.update(original_width=width, original_height=height, image_rotation=0)
    return result


def annotation(ident, results, cancelled=False, ground_truth=False, created=None,
               updated=None) -> dict:
    ann = {"id": ident, "completed_by": 1, "result": results, "was_cancelled": cancelled,
           "ground_truth": ground_truth, "lead_time": 3.2, "prediction": {}}
    if created:
        ann["created_at"] = created
    if updated:
        ann["updated_at"] = updated
    return ann


def task(ident, image, annotations, predictions=()) -> dict:
    return {"id": ident, "data": {"image": image}, "annotations": list(annotations),
            "predictions": list(predictions), "meta": {}, "project": 1,
            "created_at": "2024-01-01T00:00:00.000000Z"}


def data_uri(raw: bytes, mime: str = "image/jpeg") -> str:
    return f"data:{mime};base64,{base64.b64encode(raw).decode()}"


# ---------------------------------------------------------------- detection

def test_json_formats_detected_without_overlap(truth, tmp_path):
    voc_dir, records = truth
    coco_file = write_json(tmp_path / "instances.json", coco_doc(records))
    ls_task = task(1, "/data/upload/1/a.jpg", [annotation(1, [rect(1, 1, 5, 5)])])
    ls_task["data"]["folder"] = "images"  # a task may carry both words COCO sniffs for
    ls_file = write_json(tmp_path / "export.json", [ls_task])
    pg_file = write_jsonl(tmp_path / "db.jsonl", [{"image": data_uri(b"\xff\xd8\xff" * 3000),
                                                   "answer": "accept", "spans": []}])
    # a real COCO file lists many images before "annotations": beyond the sniffed head
    big = coco_doc(records)
    big["images"] += [{"id": 100 + i, "file_name": f"n{i}.jpg", "width": 9, "height": 9}
                      for i in range(200)]
    big_file = write_json(tmp_path / "big.json", big)
    assert b'"annotations"' not in big_file.read_bytes()[:SNIFF_BYTES]
    other = write_json(tmp_path / "config.json", {"name": "x", "data": [1]})
    text_tasks = write_jsonl(tmp_path / "textcat.jsonl", [
        {"text": 'the "image" tab', "answer": "accept"}, {"image": "a.jpg", "answer": "accept"}])
    for path, expected in [(coco_file, "coco"), (ls_file, "labelstudio"), (pg_file, "prodigy"),
                           (big_file, "coco"), (other, None), (text_tasks, None)]:
        head = path.read_bytes()[:SNIFF_BYTES]
        assert formats.detect(path, head) == expected, path.name
        claims = [m.NAME for m in (coco, labelstudio) if m.sniff(path, head)]
        assert len(claims) <= 1, (path.name, claims)
    assert b'"image"' in pg_file.read_bytes()[:SNIFF_BYTES]
    assert len(pg_file.read_bytes().split(b"\n")[0]) > SNIFF_BYTES  # first line outruns head


# ---------------------------------------------------------------- COCO

@pytest.mark.parametrize("fmt", ["coco", "auto"])
def test_coco_boxes_equal_voc(truth, tmp_path, fmt):
    voc_dir, records = truth
    export = tmp_path / "coco"
    json_file = write_json(export / "annotations" / "instances_train.json", coco_doc(records))
    summary = ingest([str(export)], tmp_path / "out", images_root=str(voc_dir), fmt=fmt)
    got = manifest(tmp_path / "out")
    assert summary["rejected"] == 0 and rejections(tmp_path / "out") == []
    assert summary["images"] == 6
    assert summary["boxes"] == sum(len(r.boxes) for r in records.values())
    assert sorted(got) == sorted(records)  # same keys as the VOC export of the same images
    for key, record in got.items():
        assert_same_boxes(record.boxes, records[key].boxes)
        assert record.source == records[key].source
        assert (record.width, record.height) == (records[key].width, records[key].height)
        assert record.provenance["format"] == "coco"
        assert record.provenance["file"] == str(json_file)
        index = sorted(records).index(key)
        assert record.provenance["element"] == f"images[{index}]"
        assert record.source_id == str(index + 1)


def test_coco_images_resolve_next_to_json(truth, tmp_path):
    voc_dir, records = truth
    export = tmp_path / "coco"
    for key in records:
        (export / "images").mkdir(parents=True, exist_ok=True)
        (export / "images" / f"{key}.jpg").write_bytes((voc_dir / f"{key}.jpg").read_bytes())
    doc = coco_doc(records)
    for image in doc["images"]:
        image["file_name"] = "images/" + image["file_name"]
    write_json(export / "instances.json", doc)
    ingest([str(export)], tmp_path / "out")
    got = manifest(tmp_path / "out")
    assert sorted(got) == sorted(f"images__{key}" for key in records)
    for key, record in records.items():
        assert got[f"images__{key}"].source.uri == str((export / "images" / f"{key}.jpg").resolve())


def test_coco_and_voc_of_same_images_merge_as_the_same_images(truth, tmp_path):
    voc_dir, records = truth
    write_json(tmp_path / "coco" / "instances.json", coco_doc(records))
    summary = ingest([str(voc_dir), str(tmp_path / "coco")], tmp_path / "out",
                     images_root=str(voc_dir))
    # same key and bit-identical boxes: the later export confirms each image, changing none
    assert (summary["images"], summary["rejected"], summary["changed"]) == (6, 0, 0)
    assert all(r.provenance["format"] == "voc" for r in manifest(tmp_path / "out").values())


def test_coco_rejections(tmp_path):
    export = tmp_path / "export"
    for name in "abcde":
        jpeg(export / f"{name}.jpg")
    doc = {
        "images": [
            {"id": 1, "file_name": "a.jpg", "width": 100, "height": 80},
            {"id": 2, "file_name": "b.jpg", "width": 100, "height": 80},   # negative
            {"id": 3, "file_name": "c.jpg"},                                # no size, a box
            {"id": 4, "file_name": "d.jpg", "width": None},                 # no size, negative
            {"id": 5, "file_name": "../../etc/passwd", "width": 100, "height": 80},
            {"id": 6, "file_name": "/etc/passwd", "width": 100, "height": 80},
            {"id": 7, "file_name": "s3://bucket/x.jpg", "width": 100, "height": 80},
            {"id": 1, "file_name": "e.jpg", "width": 100, "height": 80},   # duplicate id
        ],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 30, 20], "iscrowd": 0},
            {"id": 2, "image_id": 99, "category_id": 1, "bbox": [10, 10, 30, 20]},
            {"id": 3, "image_id": 1, "category_id": 42, "bbox": [10, 10, 30, 20]},
            {"id": 4, "image_id": 1, "category_id": 1, "bbox": [10, 10, 30, 20], "iscrowd": 1},
            {"id": 5, "image_id": 1, "category_id": 1, "bbox": [float("nan"), 1, 2, 3]},
            {"id": 6, "image_id": 1, "category_id": 1, "bbox": [90, 10, 50, 20]},
            {"id": 7, "image_id": 1, "category_id": 2, "bbox": [10, 10, 0, 20]},
            {"id": 8, "image_id": 1, "category_id": 2, "bbox": [1, 2, 3]},
            {"id": 9, "image_id": 3, "category_id": 1, "bbox": [1, 1, 5, 5]},
            {"id": 10, "image_id": 5, "category_id": 1, "bbox": [1, 1, 5, 5]},
            {"id": 11, "image_id": 1, "category_id": 2, "bbox": [-1, 0, 101, 80]},
        ],
        "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
    }
    write_json(export / "instances.json", doc)
    (export / "broken.json").write_text('{"images": [], "annotations": [{"id": 1, ')
    summary = ingest([str(export)], tmp_path / "out")
    assert rejections(tmp_path / "out") == sorted([
        ("broken.json", "document", "not valid JSON"),
        ("instances.json", "images[2]", "no usable box"),  # its one box had no image size
        ("instances.json", "images[4]", "path outside the allowed root"),
        ("instances.json", "images[5]", "absolute path refused"),
        ("instances.json", "images[6]", "unsupported image location"),
        ("instances.json", "images[7]", "duplicate image id"),
        ("instances.json", "annotations[1]", "unknown image_id"),
        ("instances.json", "annotations[2]", "unknown category_id"),
        ("instances.json", "annotations[3]", "group box"),  # exports.group_boxes: skip
        ("instances.json", "annotations[4]", "non-finite coordinates"),
        ("instances.json", "annotations[5]", "box outside the image"),
        ("instances.json", "annotations[6]", "degenerate box"),
        ("instances.json", "annotations[7]", "bad bbox"),
        ("instances.json", "annotations[8]", "missing image size"),
    ])
    assert summary["rejected"] == 14 and summary["images"] == 3 and summary["boxes"] == 2
    got = manifest(tmp_path / "out")
    assert sorted(got) == ["a", "b", "d"]
    a = got["a"]
    assert [(b.label, b.xmin, b.ymin, b.xmax, b.ymax) for b in a.boxes] == [
        ("cat", 0.1, 0.125, 0.4, 0.375), ("dog", 0.0, 0.0, 1.0, 1.0)]  # last one clipped
    assert got["b"].boxes == () and (got["b"].width, got["b"].height) == (100, 80)
    assert got["d"].boxes == () and (got["d"].width, got["d"].height) == (None, None)
    text = (tmp_path / "out" / "manifest.jsonl").read_text()
    assert "passwd" not in text and "e.jpg" not in text


def test_coco_remote_images(tmp_path):
    doc = {"images": [{"id": 10, "file_name": "https://example.com/img/x.jpg?sig=1",
                       "width": 100, "height": 80},
                      {"id": 11, "file_name": "gs://bucket/train/y.jpg", "width": 100,
                       "height": 80}],
           "annotations": [{"id": 1, "image_id": 10, "category_id": 1,
                            "bbox": [10, 20, 30, 40]}],
           "categories": [{"id": 1, "name": "cat"}]}
    path = write_json(tmp_path / "remote.json", doc)
    ctx = context(tmp_path)
    records = list(coco.parse([path], ctx))
    assert len(ctx.log) == 0
    assert [(r.source, r.key, r.source_id) for r in records] == [
        (ImageSource("url", "https://example.com/img/x.jpg?sig=1"),
         key_from_url("https://example.com/img/x.jpg?sig=1"), "10"),
        (ImageSource("gs", "gs://bucket/train/y.jpg"), key_from_url("gs://bucket/train/y.jpg"),
         "11")]
    assert records[0].key.startswith("x-")
    assert [(b.xmin, b.ymin, b.xmax, b.ymax) for b in records[0].boxes] == [
        (0.1, 0.25, 0.4, 0.75)]
    # remote images pass ingest untouched (the images stage fetches them)
    summary = ingest([str(path)], tmp_path / "out")
    assert summary["rejected"] == 0
    assert {r.key: r.source for r in manifest(tmp_path / "out").values()} == {
        r.key: r.source for r in records}


# ---------------------------------------------------------------- Label Studio

@pytest.mark.parametrize("fmt", ["labelstudio", "auto"])
def test_labelstudio_boxes_equal_voc(truth, tmp_path, fmt):
    voc_dir, records = truth
    tasks = []
    for index, (key, record) in enumerate(sorted(records.items())):
        image = [f"/data/upload/3/{index:08x}-{key}.jpg",        # uploads get a hash prefix
                 f"/data/local-files/?d={key}.jpg",
                 f"/data/local-files/?d=dataset%2Fshapes%2F{key}.jpg"][index % 3]
        results = [rect(100 * x0 / record.width, 100 * y0 / record.height,
                        100 * (x1 - x0) / record.width, 100 * (y1 - y0) / record.height,
                        label, record.width, record.height)
                   for label, x0, y0, x1, y1 in pixels(record)]
        tasks.append(task(100 + index, image, [annotation(index, results)],
                          predictions=[{"result": results[:1], "model_version": "v0"}]))
    json_file = write_json(tmp_path / "ls" / "project-3.json", tasks)
    summary = ingest([str(tmp_path / "ls")], tmp_path / "out", images_root=str(voc_dir), fmt=fmt)
    assert summary["rejected"] == 0 and summary["images"] == 6
    got = manifest(tmp_path / "out")
    assert sorted(got) == sorted(records)
    for index, (key, record) in enumerate(sorted(got.items())):
        assert_same_boxes(record.boxes, records[key].boxes)
        assert record.source == records[key].source
        assert (record.width, record.height) == (records[key].width, records[key].height)
        assert record.source_id == str(100 + index)
        assert record.provenance == {"export": str(tmp_path / "ls"),
                                     "landed_at": summary["exports"][0]["landed_at"],
                                     "format": "labelstudio", "file": str(json_file),
                                     "element": f"tasks[{index}]", "task": 100 + index,
                                     "annotation": index}


@pytest.fixture
def ls_export(tmp_path):
    """Write tasks as a Label Studio export with images img_1.. (200x100); ingest it."""
    def run(tasks, images=5):
        export = tmp_path / "ls"
        for n in range(1, images + 1):
            jpeg(export / "images" / f"img_{n}.jpg", 200, 100)
        write_json(export / "export.json", tasks)
        out = tmp_path / "out"
        summary = ingest([str(export)], out, images_root=str(export / "images"))
        return summary, manifest(out), out
    return run


def test_labelstudio_cancelled_and_unlabeled_tasks(ls_export):
    summary, got, out = ls_export([
        task(1, "/data/upload/1/img_1.jpg", [
            annotation(11, [rect(0, 0, 50, 50, "late")], cancelled=True,
                       updated="2024-06-01T00:00:00Z"),
            annotation(10, [rect(10, 20, 30, 40, "kept")], updated="2024-01-01T00:00:00Z")]),
        task(2, "/data/upload/1/img_2.jpg", [
            annotation(20, [rect(0, 0, 50, 50)], cancelled=True),
            annotation(21, [], cancelled=True)]),
        task(3, "/data/upload/1/img_3.jpg", [],
             predictions=[{"result": [rect(0, 0, 50, 50)], "score": 0.9}]),
    ])
    assert sorted(got) == ["img_1"]
    assert [b.label for b in got["img_1"].boxes] == ["kept"]
    assert got["img_1"].provenance["annotation"] == 10
    assert rejections(out) == sorted([
        ("export.json", "task 1 annotation 11", "cancelled annotation"),
        ("export.json", "task 2 annotation 20", "cancelled annotation"),
        ("export.json", "task 2 annotation 21", "cancelled annotation"),
        ("export.json", "task 2", "unlabeled task"),
        ("export.json", "task 3", "unlabeled task"),
    ])
    assert "all 2 annotations were cancelled" in reasons(out)["task 2"]
    assert "predictions are not labels" in reasons(out)["task 3"]
    assert summary["rejections_by_reason"] == {"cancelled annotation": 3, "unlabeled task": 2}


def test_labelstudio_ground_truth_preferred_over_latest(ls_export):
    _, got, out = ls_export([task(1, "/data/upload/1/img_1.jpg", [
        annotation(1, [rect(10, 10, 20, 20, "truth")], ground_truth=True,
                   created="2023-01-01T00:00:00Z"),
        annotation(2, [rect(10, 10, 20, 20, "newer")], updated="2024-09-09T00:00:00Z")])])
    assert [b.label for b in got["img_1"].boxes] == ["truth"]
    assert reasons(out) == {"task 1 annotation 2":
                            "superseded annotation: annotation 1 (ground truth) is used"}


def test_labelstudio_latest_annotation(ls_export):
    _, got, out = ls_export([
        # by updated_at, whatever the list order or ids (naive and Z timestamps mixed)
        task(1, "/data/upload/1/img_1.jpg", [
            annotation(5, [rect(1, 1, 9, 9, "new")], created="2023-01-01T00:00:00",
                       updated="2024-03-01T10:00:00.000000Z"),
            annotation(9, [rect(1, 1, 9, 9, "old")], updated="2024-01-01T10:00:00")]),
        # created_at when nothing was updated
        task(2, "/data/upload/1/img_2.jpg", [
            annotation(1, [rect(1, 1, 9, 9, "newer")], created="2024-05-01T00:00:00Z"),
            annotation(2, [rect(1, 1, 9, 9, "older")], created="2024-04-01T00:00:00Z")]),
        # highest id without timestamps
        task(3, "/data/upload/1/img_3.jpg", [
            annotation(3, [rect(1, 1, 9, 9, "low")]),
            annotation(7, [rect(1, 1, 9, 9, "high")]),
            annotation(5, [rect(1, 1, 9, 9, "mid")])]),
    ])
    assert {k: [b.label for b in r.boxes] for k, r in got.items()} == {
        "img_1": ["new"], "img_2": ["newer"], "img_3": ["high"]}
    assert rejections(out) == sorted([
        ("export.json", "task 1 annotation 9", "superseded annotation"),
        ("export.json", "task 2 annotation 2", "superseded annotation"),
        ("export.json", "task 3 annotation 3", "superseded annotation"),
        ("export.json", "task 3 annotation 5", "superseded annotation")])


def test_labelstudio_percent_coordinates(ls_export):
    _, got, out = ls_export([
        task(1, "/data/upload/1/img_1.jpg", [annotation(1, [rect(10, 20, 30, 40, "a")])]),
        # percent needs no size: a result without original_width/height still places the box
        task(2, "/data/upload/1/img_2.jpg", [annotation(2, [rect(50, 0, 50, 100, "b",
                                                                  sized=False)])]),
        task(3, "/data/upload/1/img_3.jpg", [annotation(3, [])]),  # labelled: nothing there
    ])
    assert rejections(out) == []
    one, two, three = got["img_1"], got["img_2"], got["img_3"]
    assert [(b.label, b.xmin, b.ymin, b.xmax, b.ymax) for b in one.boxes] == [
        ("a", 0.1, 0.2, pytest.approx(0.4), pytest.approx(0.6))]
    assert (one.width, one.height) == (200, 100)
    assert [(b.xmin, b.ymin, b.xmax, b.ymax) for b in two.boxes] == [(0.5, 0.0, 1.0, 1.0)]
    assert (two.width, two.height) == (None, None)
    assert three.boxes == ()


def test_labelstudio_rotated_box_becomes_envelope(ls_export):
    # 200x100 image; box x=50% y=20% w=10% h=20% -> pixels (100, 20) 20x20
    # 30 deg clockwise about (100, 20): corners (100,20) (117.32,30) (107.32,47.32) (90,37.32)
    # 90 deg: corners (100,20) (100,40) (80,40) (80,20)
    _, got, out = ls_export([
        task(1, "/data/upload/1/img_1.jpg", [annotation(1, [rect(50, 20, 10, 20, rotation=30)])]),
        task(2, "/data/upload/1/img_2.jpg", [annotation(2, [rect(50, 20, 10, 20, rotation=90)])]),
        task(3, "/data/upload/1/img_3.jpg", [annotation(3, [rect(50, 20, 10, 20,
                                                                  rotation=360)])]),
        task(4, "/data/upload/1/img_4.jpg", [annotation(4, [rect(50, 20, 10, 20, rotation=30,
                                                                  sized=False)])]),
    ])
    box = lambda key: [(b.xmin, b.ymin, b.xmax, b.ymax) for b in got[key].boxes]
    assert box("img_1") == [pytest.approx((0.45, 0.2, 0.5866025403784439, 0.4732050807568877),
                                          abs=1e-9)]
    assert box("img_2") == [pytest.approx((0.4, 0.2, 0.5, 0.4), abs=1e-9)]
    assert box("img_3") == [pytest.approx((0.5, 0.2, 0.6, 0.4), abs=1e-9)]
    assert "img_4" not in got  # its one box was refused: not a negative
    assert reasons(out) == {"task 4 annotation 4 result[0]":
                            "missing image size: a rotated box needs original_width/height",
                            "task 4": "no usable box: image dropped, all 1 results refused"}


def test_labelstudio_image_references_refused_or_unsupported(ls_export):
    good = [annotation(1, [rect(10, 10, 10, 10)])]
    summary, got, out = ls_export([
        task(1, "/data/local-files/?d=../../etc/passwd", good),
        task(2, "../../etc/passwd", good),
        task(3, "/etc/passwd", good),
        task(4, "s3://bucket/img_1.jpg", good),
        task(5, "/data/local-files/", good),
        task(6, "/data/local-files/?d=img_2.jpg", good),
        task(7, "/data/local-files/?d=images/img_3.jpg", good),  # d= path from the doc root
        {"id": 8, "data": {"text": "no image"}, "annotations": good},
    ])
    assert rejections(out) == sorted([
        ("export.json", "task 1", "path outside the allowed root"),
        ("export.json", "task 2", "path outside the allowed root"),
        ("export.json", "task 3", "absolute path refused"),
        ("export.json", "task 4", "unsupported image location"),
        ("export.json", "task 5", "bad image reference"),
        ("export.json", "task 8", "no image"),
    ])
    assert sorted(got) == ["img_2", "img_3"]
    assert "passwd" not in (out / "manifest.jsonl").read_text()


def test_labelstudio_remote_images(tmp_path):
    path = write_json(tmp_path / "export.json", [
        task(1, "https://cdn.example.com/a/cat.jpg", [annotation(1, [rect(10, 10, 10, 10)])]),
        task(2, "gs://bucket/dog.png", [annotation(2, [rect(10, 10, 10, 10)])])])
    ctx = context(tmp_path)
    records = list(labelstudio.parse([path], ctx))
    assert len(ctx.log) == 0
    assert [(r.source, r.key) for r in records] == [
        (ImageSource("url", "https://cdn.example.com/a/cat.jpg"),
         key_from_url("https://cdn.example.com/a/cat.jpg")),
        (ImageSource("gs", "gs://bucket/dog.png"), key_from_url("gs://bucket/dog.png"))]


# ---------------------------------------------------------------- Prodigy

def prodigy_tasks(voc_dir: Path, records: dict) -> list[dict]:
    lines = []
    for index, (key, record) in enumerate(sorted(records.items())):
        spans = []
        for label, x0, y0, x1, y1 in pixels(record):
            if index % 2:
                spans.append({"label": label, "x": x0, "y": y0, "width": x1 - x0,
                              "height": y1 - y0, "type": "rect", "color": "yellow"})
            else:
                spans.append({"label": label, "type": "rect",
                              "points": [[x0, y0], [x0, y1], [x1, y1], [x1, y0]]})
        line = {"width": record.width, "height": record.height, "answer": "accept",
                "spans": spans, "_view_id": "image_manual", "_timestamp": 1700000000 + index}
        if index % 3 == 0:    # Images loader: base64 inline, path kept for reference
            line |= {"image": data_uri((voc_dir / f"{key}.jpg").read_bytes()),
                     "path": f"/home/ann/shapes/{key}.jpg", "_input_hash": 1000 + index,
                     "_task_hash": -2000 - index, "meta": {"model_version": "det-v3"}}
        elif index % 3 == 1:  # --remove-base64: a relative path
            line |= {"image": f"{key}.jpg", "_input_hash": 1000 + index}
        else:                 # the annotator's absolute path, no hashes
            line |= {"image": f"/home/ann/shapes/{key}.jpg", "meta": {"file": f"{key}.jpg"}}
        lines.append(line)
    return lines


@pytest.mark.parametrize("fmt", ["prodigy", "auto"])
def test_prodigy_boxes_equal_voc(truth, tmp_path, fmt):
    voc_dir, records = truth
    keys = sorted(records)
    jsonl = write_jsonl(tmp_path / "pg" / "dataset.jsonl", prodigy_tasks(voc_dir, records))
    summary = ingest([str(tmp_path / "pg")], tmp_path / "out", images_root=str(voc_dir), fmt=fmt)
    assert summary["rejected"] == 0 and summary["images"] == 6
    got = {r.provenance["line"]: r for r in manifest(tmp_path / "out").values()}
    assert sorted(got) == [1, 2, 3, 4, 5, 6]
    for line, record in got.items():
        index, key = line - 1, keys[line - 1]
        assert_same_boxes(record.boxes, records[key].boxes)
        assert (record.width, record.height) == (records[key].width, records[key].height)
        assert record.provenance["file"] == str(jsonl)
        if index % 3 == 0:
            raw = (voc_dir / f"{key}.jpg").read_bytes()
            assert record.key.startswith("inline-") and len(record.key) == len("inline-") + 16
            assert Path(record.source.uri).read_bytes() == raw
            assert Path(record.source.uri).parent == tmp_path / "out-inline"
            assert Path(record.source.uri).suffix == ".jpg"
            assert record.source_id == str(-2000 - index)  # _task_hash first
            assert record.provenance["model_version"] == "det-v3"
        else:
            assert record.key == key and record.source == records[key].source
            assert "model_version" not in record.provenance
            assert record.source_id == (str(1000 + index) if index % 3 == 1
                                        else f"/home/ann/shapes/{key}.jpg")
    text = (tmp_path / "out" / "manifest.jsonl").read_text()
    assert "base64" not in text and "data:" not in text and len(text) < 20_000


def test_prodigy_answers_malformed_and_truncated_lines(tmp_path):
    export = tmp_path / "pg"
    jpeg(export / "a.jpg")
    jpeg(export / "b.jpg")
    box = {"label": "cat", "x": 10, "y": 10, "width": 20, "height": 20}
    base = {"width": 100, "height": 80, "spans": [box]}
    jsonl = write_jsonl(export / "db.jsonl", [
        base | {"image": "a.jpg", "answer": "accept"},
        base | {"image": "a.jpg", "answer": "reject"},
        base | {"image": "b.jpg", "answer": "ignore"},
        '{"image": "b.jpg", "answer": accept}',
        "",
        "[1, 2]",
        base | {"image": "b.jpg", "answer": "accept"},
        base | {"image": "b.jpg"},
    ])
    with open(jsonl, "a") as fh:  # the export was cut off mid-line
        fh.write('{"image": "a.jpg", "width": 100, "height": 80, "answer": "acc')
    summary = ingest([str(export)], tmp_path / "out")
    assert rejections(tmp_path / "out") == sorted([
        ("db.jsonl", "line 2", "not accepted"),
        ("db.jsonl", "line 3", "not accepted"),
        ("db.jsonl", "line 4", "malformed line"),
        ("db.jsonl", "line 6", "malformed line"),
        ("db.jsonl", "line 8", "not accepted"),
        ("db.jsonl", "line 9", "malformed line"),
    ])
    why = reasons(tmp_path / "out")
    assert why["line 2"] == "not accepted: reject" and why["line 3"] == "not accepted: ignore"
    assert why["line 8"] == "not accepted: no answer"
    assert "truncated" in why["line 9"] and "truncated" not in why["line 4"]
    got = manifest(tmp_path / "out")
    assert sorted(got) == ["a", "b"] and summary["boxes"] == 2
    assert {r.provenance["line"] for r in got.values()} == {1, 7}
    assert got["a"].boxes[0].xmax == pytest.approx(0.3)


def test_prodigy_inline_images(tmp_path):
    png = io.BytesIO()
    Image.new("RGB", (50, 40), (0, 0, 255)).save(png, "PNG")
    span = {"label": "dot", "points": [[5, 4], [25, 4], [25, 20], [5, 20]]}
    line = {"image": data_uri(png.getvalue(), "image/png"), "width": 50, "height": 40,
            "answer": "accept", "spans": [span]}
    export = tmp_path / "pg"
    write_jsonl(export / "db.jsonl", [
        line,
        line | {"_input_hash": 7},                                    # same image again
        line | {"image": data_uri(b"<html>not found</html>", "image/png")},
        line | {"image": "data:image/png;base64,@@not base64@@"},
        line | {"image": "data:image/png,rawpixels"},
    ])
    summary = ingest([str(export)], tmp_path / "out")
    assert rejections(tmp_path / "out") == sorted([
        ("db.jsonl", "line 3", "not an image"),
        ("db.jsonl", "line 4", "bad data URI"),
        ("db.jsonl", "line 5", "bad data URI"),
        ("db.jsonl", "7", "duplicate record"),
    ])
    [record] = manifest(tmp_path / "out").values()
    written = list((tmp_path / "out-inline").iterdir())
    assert [p.suffix for p in written] == [".png"]
    assert written[0].read_bytes() == png.getvalue()
    assert record.source == ImageSource("local", str(written[0]))
    assert record.key == "inline-" + written[0].stem[:16]
    assert record.source_id == record.key  # no hash, no path: never the data URI
    assert (record.boxes[0].xmin, record.boxes[0].ymax) == (0.1, 0.5)
    assert summary["images"] == 1
    text = (tmp_path / "out" / "manifest.jsonl").read_text()
    assert "base64" not in text and "data:" not in text


def test_prodigy_missing_size_and_paths(tmp_path):
    export = tmp_path / "pg"
    jpeg(export / "a.jpg")
    jpeg(export / "b.jpg")
    span = {"label": "cat", "x": 1, "y": 1, "width": 5, "height": 5}
    write_jsonl(export / "db.jsonl", [
        {"image": "a.jpg", "answer": "accept", "spans": [span, span]},  # pixels, no size
        {"image": "b.jpg", "answer": "accept", "spans": []},            # negative, no size
        {"image": "../../etc/passwd", "width": 9, "height": 9, "answer": "accept"},
        {"image": "s3://bucket/a.jpg", "width": 9, "height": 9, "answer": "accept"},
        {"path": "a.jpg", "width": 100, "height": 80, "answer": "accept",
         "spans": [{"label": "", "x": 1, "y": 1, "width": 5, "height": 5},
                   {"label": "nan", "points": [[1, 1], [float("nan"), 5], [9, 9]]},
                   {"label": "few", "points": [[1, 1]]}]},
    ])
    ingest([str(export)], tmp_path / "out")
    assert rejections(tmp_path / "out") == sorted([
        ("db.jsonl", "line 1", "no usable box"),
        ("db.jsonl", "line 1 span[0]", "missing image size"),
        ("db.jsonl", "line 1 span[1]", "missing image size"),
        ("db.jsonl", "line 3", "path outside the allowed root"),
        ("db.jsonl", "line 4", "unsupported image location"),
        ("db.jsonl", "line 5 span[0]", "empty class name"),
        ("db.jsonl", "line 5 span[1]", "non-finite coordinates"),
        ("db.jsonl", "line 5 span[2]", "bad span"),
        ("db.jsonl", "line 5", "no usable box"),
    ])
    got = manifest(tmp_path / "out")
    assert sorted(got) == ["b"]  # "a": every span refused, twice; not a negative
    assert (got["b"].width, got["b"].boxes) == (None, ())


def test_prodigy_remote_image(tmp_path):
    path = write_jsonl(tmp_path / "db.jsonl", [
        {"image": "https://example.com/p/q.jpg", "width": 10, "height": 10, "answer": "accept",
         "_task_hash": 42, "spans": [{"label": "x", "x": 0, "y": 0, "width": 5, "height": 5}]}])
    ctx = context(tmp_path)
    [record] = prodigy.parse([path], ctx)
    assert record.source == ImageSource("url", "https://example.com/p/q.jpg")
    assert record.key == key_from_url("https://example.com/p/q.jpg") and record.source_id == "42"
    assert len(ctx.log) == 0


def test_prodigy_streams_line_by_line(tmp_path):
    jpeg(tmp_path / "a.jpg")
    padding = "x" * 260_000
    line = {"image": "a.jpg", "width": 100, "height": 80, "answer": "accept",
            "meta": {"padding": padding}, "spans": [{"label": "c", "x": 1, "y": 1,
                                                     "width": 9, "height": 9}]}
    path = write_jsonl(tmp_path / "big.jsonl", [line] * 2 + ["{broken"] + [line] * 37)
    assert path.stat().st_size > 10_000_000
    ctx = context(tmp_path)
    tracemalloc.start()
    try:
        records = prodigy.parse([path], ctx)
        first = next(records)
        assert first.provenance["line"] == 1 and len(ctx.log) == 0  # line 3 not read yet
        rest = sum(1 for _ in records)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert rest == 38 and [r.record for r in ctx.log.items] == ["line 3"]
    assert peak < 3_000_000, f"peak {peak} bytes: the file was not streamed"


# ---------------------------------------------------------------- hostile JSON values (#18)

DEEP = "[" * 100_000 + "]" * 100_000  # deeper than any recursion limit


def test_deeply_nested_value_rejects_its_file_or_line_not_the_ingest(tmp_path):
    """json's C decoder raises RecursionError on deep nesting; it must cost one COCO file,
    one Label Studio file or one Prodigy line, never the whole ingest."""
    export = tmp_path / "export"
    jpeg(export / "a.jpg")
    jpeg(export / "b.jpg")
    image = '{"id": 1, "file_name": "a.jpg", "width": 100, "height": 80, "extra": %s}' % DEEP
    (export / "deep_coco.json").write_text('{"images": [%s], "annotations": []}' % image)
    (export / "deep_ls.json").write_text('[{"data": {"image": "a.jpg", "x": %s}, '
                                         '"annotations": [{"result": []}]}]' % DEEP)
    write_jsonl(export / "tasks.jsonl", [
        '{"image": "a.jpg", "answer": "accept", "meta": %s}' % DEEP,
        {"image": "b.jpg", "answer": "accept", "width": 100, "height": 80, "spans": [
            {"label": "cat", "x": 10, "y": 10, "width": 20, "height": 20}]}])
    out = tmp_path / "out"
    summary = ingest([str(export)], out)
    assert list(manifest(out)) == ["b"]
    assert summary["rejected"] == 3
    assert reasons(out)["line 1"] == "malformed line: nested too deeply to parse"
    assert {(name, reason) for name, _, reason in rejections(out)} == {
        ("deep_coco.json", "not valid JSON"), ("deep_ls.json", "not valid JSON"),
        ("tasks.jsonl", "malformed line")}


def test_image_whose_boxes_were_all_refused_is_dropped_not_kept_as_negative(tmp_path):
    """One rule for every format (#18): an image that HAD boxes, all refused, is rejected with
    a reason (kept, it would teach the model its objects are background); an image that had
    none stays a negative."""
    export = tmp_path / "export"
    for name in ("coco_bad", "coco_empty", "ls_bad", "ls_empty", "pg_bad", "pg_empty"):
        jpeg(export / f"{name}.jpg")
    write_json(export / "instances.json", {
        "images": [{"id": 1, "file_name": "coco_bad.jpg", "width": 100, "height": 80},
                   {"id": 2, "file_name": "coco_empty.jpg", "width": 100, "height": 80}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [500, 10, 30, 20]},
                        {"id": 2, "image_id": 1, "category_id": 9, "bbox": [1, 1, 5, 5]}],
        "categories": [{"id": 1, "name": "cat"}]})
    write_json(export / "ls.json", [
        task(1, "ls_bad.jpg", [annotation(1, [rect(10, 10, 0, 5),
                                              {"type": "polygonlabels", "value": {}}])]),
        task(2, "ls_empty.jpg", [annotation(2, [])])])
    write_jsonl(export / "db.jsonl", [
        {"image": "pg_bad.jpg", "width": 100, "height": 80, "answer": "accept",
         "spans": [{"label": "cat", "x": 10, "y": 10, "width": 500, "height": 5}]},
        {"image": "pg_empty.jpg", "width": 100, "height": 80, "answer": "accept", "spans": []}])
    out = tmp_path / "out"
    ingest([str(export)], out)
    assert sorted(manifest(out)) == ["coco_empty", "ls_empty", "pg_empty"]
    rows = [json.loads(line) for line in (out / "rejections.jsonl").read_text().splitlines()]
    dropped = {(Path(r["file"]).name, r["record"]): r["reason"] for r in rows
               if r["reason"].startswith("no usable box")}
    assert dropped == {
        ("instances.json", "images[0]"): "no usable box: image dropped, all 2 annotations refused",
        ("ls.json", "task 1"): "no usable box: image dropped, all 2 results refused",
        ("db.jsonl", "line 1"): "no usable box: image dropped, all 1 spans refused"}


def test_coco_annotations_that_are_not_a_list_reject_the_file(tmp_path):
    """Found by fuzzing: `"annotations": true` raised TypeError out of the parser."""
    jpeg(tmp_path / "a.jpg")
    write_json(tmp_path / "x.json", {"images": [{"id": 1, "file_name": "a.jpg"}],
                                     "annotations": True})
    ctx = context(tmp_path)
    assert list(coco.parse([tmp_path / "x.json"], ctx)) == []
    [rejection] = ctx.log.items
    assert (rejection.record, rejection.reason) == (
        "document", "not a COCO export: annotations is not a list")
