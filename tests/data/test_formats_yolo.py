"""YOLO labels as Roboflow, Ultralytics, Darknet (CVAT "YOLO 1.1") and labelImg write them.

The exports are built by the tests from the synthetic VOC sample, whose true pixel boxes are
read back through the VOC parser: a YOLO export of the same images must give the same boxes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from odapi_operators.core.data import sample_data
from odapi_operators.core.data.formats import ParseContext, detect, yolo
from odapi_operators.core.data.ingest import ingest
from odapi_operators.core.data.manifest import read_manifest
from odapi_operators.core.rejections import RejectionLog

CLASSES = list(sample_data.CLASSES)
SPLITS = {"train": 6, "valid": 3, "test": 3}  # Roboflow's folder names


def yolo_line(record, box) -> str:
    """`class cx cy w h` with six decimals, as Roboflow and Ultralytics write them."""
    cx, cy = (box.xmin + box.xmax) / 2, (box.ymin + box.ymax) / 2
    w, h = box.xmax - box.xmin, box.ymax - box.ymin
    return f"{CLASSES.index(box.label)} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}"


def pixel_boxes(boxes, width: int, height: int) -> list[tuple]:
    return sorted((b.label, round(b.xmin * width), round(b.ymin * height),
                   round(b.xmax * width), round(b.ymax * height)) for b in boxes)


def manifest(out: Path):
    return list(read_manifest(out / "manifest.jsonl"))


def rejections(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "rejections.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    """(VOC export folder, VOC-ingested records sorted by key): the ground truth."""
    export = tmp_path_factory.mktemp("voc")
    sample_data.generate(export, count=sum(SPLITS.values()), seed=11)
    out = tmp_path_factory.mktemp("voc-ingest") / "out"
    assert ingest([str(export)], out)["rejected"] == 0
    return export, manifest(out)


def roboflow_export(root: Path, sample) -> dict[str, object]:
    """Roboflow's "YOLOv8" export: data.yaml, README files, <split>/images + <split>/labels.
    Returns the ground-truth record for each image file name."""
    export, records = sample
    truth = {}
    records = iter(records)
    for split, count in SPLITS.items():
        for _ in range(count):
            record = next(records)
            name = Path(record.source.uri).name
            image = root / split / "images" / name
            image.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(record.source.uri, image)
            label = root / split / "labels" / f"{Path(name).stem}.txt"
            label.parent.mkdir(parents=True, exist_ok=True)
            label.write_text("".join(yolo_line(record, b) + "\n" for b in record.boxes))
            truth[name] = record
    (root / "data.yaml").write_text(
        "train: ../train/images\nval: ../valid/images\ntest: ../test/images\n\n"
        f"nc: {len(CLASSES)}\nnames: {json.dumps(CLASSES)}\n\n"
        "roboflow:\n  workspace: shapes\n  project: shapes\n  version: 1\n")
    (root / "README.roboflow.txt").write_text("Shapes - v1\n==============\nExported via "
                                              "roboflow.com\n")
    (root / "README.dataset.txt").write_text("# Shapes\nThis dataset was exported via "
                                             "roboflow.com\n")
    return truth


def test_roboflow_export_gives_the_same_boxes_as_the_voc_export(tmp_path, sample):
    export = tmp_path / "roboflow"
    truth = roboflow_export(export, sample)
    summary = ingest([str(export)], tmp_path / "out")
    records = manifest(tmp_path / "out")
    assert summary["rejected"] == 0, rejections(tmp_path / "out")
    assert len(records) == sum(SPLITS.values()) and summary["boxes"] == sum(
        len(r.boxes) for r in truth.values())
    for record in records:
        expected = truth[Path(record.source.uri).name]
        assert record.key.startswith(("train__images__", "valid__images__", "test__images__"))
        assert record.provenance["names"] == str(export / "data.yaml")
        assert pixel_boxes(record.boxes, expected.width, expected.height) == \
            pixel_boxes(expected.boxes, expected.width, expected.height)
    assert sorted(Path(p).name for p in summary["ignored_files"]) == [
        "README.dataset.txt", "README.roboflow.txt"]


def test_same_file_name_in_two_splits_stays_two_images(tmp_path, sample):
    export = tmp_path / "roboflow"
    roboflow_export(export, sample)
    name = next((export / "train" / "images").iterdir()).name
    shutil.copy(export / "train" / "images" / name, export / "valid" / "images" / name)
    shutil.copy(export / "train" / "labels" / f"{Path(name).stem}.txt",
                export / "valid" / "labels" / f"{Path(name).stem}.txt")
    summary = ingest([str(export)], tmp_path / "out", fmt="yolo")
    keys = {r.key for r in manifest(tmp_path / "out")}
    stem = Path(name).stem
    assert {f"train__images__{stem}", f"valid__images__{stem}"} <= keys
    assert summary["images"] == sum(SPLITS.values()) + 1 and summary["rejected"] == 0


def test_empty_label_file_and_missing_label_file_are_negatives(tmp_path, sample):
    """Ultralytics trains on an image without a label file as background; so do we."""
    export = tmp_path / "roboflow"
    roboflow_export(export, sample)
    labels = sorted((export / "train" / "labels").iterdir())
    labels[0].write_text("")
    labels[1].unlink()
    summary = ingest([str(export)], tmp_path / "out")
    records = {Path(r.source.uri).stem: r for r in manifest(tmp_path / "out")}
    assert summary["images"] == sum(SPLITS.values()) and summary["rejected"] == 0
    empty, missing = records[labels[0].stem], records[labels[1].stem]
    assert empty.boxes == () and empty.provenance["file"] == str(labels[0])
    assert missing.boxes == () and missing.provenance["background"] == "no label file"


def test_roboflow_yolo_darknet_export(tmp_path, sample):
    """Roboflow's "YOLO Darknet": images and labels side by side, names in _darknet.labels."""
    _, records = sample
    export = tmp_path / "darknet"
    (export / "train").mkdir(parents=True)
    (export / "train" / "_darknet.labels").write_text("\n".join(CLASSES))
    for record in records[:3]:
        name = Path(record.source.uri).name
        shutil.copy(record.source.uri, export / "train" / name)
        (export / "train" / f"{Path(name).stem}.txt").write_text(
            "".join(yolo_line(record, b) + "\n" for b in record.boxes))
    summary = ingest([str(export)], tmp_path / "out")
    assert summary["images"] == 3 and summary["rejected"] == 0, rejections(tmp_path / "out")
    truth = {Path(r.source.uri).name: r for r in records[:3]}
    for mine in manifest(tmp_path / "out"):
        expected = truth[Path(mine.source.uri).name]
        assert mine.provenance["names"] == str(export / "train" / "_darknet.labels")
        assert pixel_boxes(mine.boxes, expected.width, expected.height) == \
            pixel_boxes(expected.boxes, expected.width, expected.height)


def test_darknet_export_from_cvat_yolo_1_1(tmp_path, sample):
    """CVAT's "YOLO 1.1": obj.data, obj.names, train.txt, images next to their labels."""
    _, records = sample
    export = tmp_path / "cvat-yolo"
    (export / "obj_train_data").mkdir(parents=True)
    (export / "obj.names").write_text("".join(f"{c}\n" for c in CLASSES))
    (export / "obj.data").write_text(f"classes = {len(CLASSES)}\ntrain = data/train.txt\n"
                                     "names = data/obj.names\nbackup = backup/\n")
    listed = []
    for record in records[:4]:
        name = Path(record.source.uri).name
        shutil.copy(record.source.uri, export / "obj_train_data" / name)
        (export / "obj_train_data" / f"{Path(name).stem}.txt").write_text(
            "\n".join(yolo_line(record, b) for b in record.boxes))  # no final newline
        listed.append(f"data/obj_train_data/{name}")
    (export / "train.txt").write_text("\n".join(listed) + "\n")
    for fmt in ("auto", "yolo"):
        out = tmp_path / f"out-{fmt}"
        summary = ingest([str(export)], out, fmt=fmt)
        assert summary["images"] == 4 and summary["rejected"] == 0, rejections(out)
        got = {Path(r.source.uri).name: r for r in manifest(out)}
        for record in records[:4]:
            mine = got[Path(record.source.uri).name]
            assert mine.key == f"obj_train_data__{Path(record.source.uri).stem}"
            assert pixel_boxes(mine.boxes, record.width, record.height) == \
                pixel_boxes(record.boxes, record.width, record.height)


def test_labelimg_classes_txt_and_names_as_a_mapping(tmp_path, sample):
    """labelImg writes classes.txt next to the labels; Ultralytics YAML may map id -> name."""
    _, records = sample
    flat, mapped = tmp_path / "labelimg", tmp_path / "ultralytics"
    for export, names in ((flat, "classes.txt"), (mapped, "data.yaml")):
        folder = export if names == "classes.txt" else export / "labels"
        for record in records[:3]:
            name = Path(record.source.uri).name
            target = export / ("images" if names == "data.yaml" else "") / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(record.source.uri, target)
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{Path(name).stem}.txt").write_text(
                "".join(yolo_line(record, b) + "\n" for b in record.boxes))
    (flat / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    (mapped / "data.yaml").write_text(yaml.safe_dump(
        {"path": ".", "train": "images", "val": "images",
         "names": {2: CLASSES[2], 0: CLASSES[0], 1: CLASSES[1]}}))
    for export in (flat, mapped):
        out = tmp_path / f"out-{export.name}"
        summary = ingest([str(export)], out)
        assert summary["images"] == 3 and summary["rejected"] == 0, rejections(out)
        expected = {Path(r.source.uri).name: r for r in records[:3]}
        for mine in manifest(out):
            truth = expected[Path(mine.source.uri).name]
            assert pixel_boxes(mine.boxes, truth.width, truth.height) == \
                pixel_boxes(truth.boxes, truth.width, truth.height)


BAD_LABELS = """\
0 0.500000 0.500000 0.400000 0.400000
1 0.250000 0.250000 0.100000 0.100000 0.87
x 0.5 0.5 0.1 0.1
7 0.5 0.5 0.1 0.1
2 0.5 nan 0.1 0.1
2 0.5 0.5 0.1
1 1.500000 0.500000 0.200000 0.200000
2 0.5 0.5 0.0 0.2
1 0.1 0.1 0.3 0.1 0.2 0.4 0.5
2 0.10 0.20 0.30 0.20 0.30 0.60 0.10 0.60
"""


def test_bad_lines_are_rejected_by_file_and_line_and_good_ones_flow(tmp_path, sample):
    _, records = sample
    export = tmp_path / "yolo"
    (export / "images").mkdir(parents=True)
    (export / "labels").mkdir()
    shutil.copy(records[0].source.uri, export / "images" / "a.jpg")
    shutil.copy(records[1].source.uri, export / "images" / "b.jpg")
    (export / "labels" / "a.txt").write_text(BAD_LABELS)
    (export / "labels" / "b.txt").write_text("0 0.5 0.5 0.2 0.2 0.99\n")  # a prediction file
    (export / "labels" / "orphan.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    (export / "data.yaml").write_text(f"names: {json.dumps(CLASSES)}\n")
    summary = ingest([str(export)], tmp_path / "out")
    label = str(export / "labels" / "a.txt")
    got = {(r["file"], r["record"]): r["reason"] for r in rejections(tmp_path / "out")}
    assert got[(label, "line 2")].startswith("prediction, not a label: 6 values")
    assert got[(label, "line 3")].startswith("bad class id: 'x'")
    assert got[(label, "line 4")] == (f"unknown class id: 7, but {export / 'data.yaml'} "
                                      "names 3 classes (0..2)")
    assert got[(label, "line 5")].startswith("non-finite coordinates")
    assert got[(label, "line 6")].startswith("wrong value count: 4 values")
    assert got[(label, "line 7")].startswith("box outside the image")
    assert got[(label, "line 8")].startswith("degenerate box")
    assert got[(label, "line 9")].startswith("wrong value count: 8 values")
    b_file = str(export / "labels" / "b.txt")
    assert got[(b_file, "line 1")].startswith("prediction, not a label")
    assert got[(b_file, "file")].startswith("no usable box: image dropped, all 1 lines")
    orphan = str(export / "labels" / "orphan.txt")
    assert got[(orphan, "file")].startswith("missing image: no image named orphan.* in")
    assert len(got) == 11
    (record,) = manifest(tmp_path / "out")
    assert record.source.uri == str((export / "images" / "a.jpg").resolve())
    assert [(b.label, round(b.xmin, 6), round(b.ymin, 6), round(b.xmax, 6), round(b.ymax, 6))
            for b in record.boxes] == [("circle", 0.3, 0.3, 0.7, 0.7),
                                       ("triangle", 0.1, 0.2, 0.3, 0.6)]  # polygon envelope
    assert summary["images"] == 1


def test_no_class_names_is_a_clear_rejection(tmp_path, sample):
    _, records = sample
    export = tmp_path / "yolo"
    (export / "images").mkdir(parents=True)
    (export / "labels").mkdir()
    shutil.copy(records[0].source.uri, export / "images" / "a.jpg")
    (export / "labels" / "a.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    log = RejectionLog()
    ctx = ParseContext(export_root=export, images_root=None, log=log)
    assert list(yolo.parse([export / "labels" / "a.txt"], ctx)) == []
    assert [r.record for r in log.items] == ["line 1", "file"]
    assert log.items[0].reason.startswith("no class names: no data.yaml (names:), classes.txt")


def test_bad_names_files_are_reported(tmp_path):
    bad = {"data.yaml": "names: [a, b]\nnc: 3\n", "other.yaml": "names: {0: a, 2: b}\n",
           "obj.names": "a\n\nb\n"}
    for name, text in bad.items():
        (tmp_path / name).write_text(text)
    log = RejectionLog()
    ctx = ParseContext(export_root=tmp_path, images_root=None, log=log)
    list(yolo.parse([tmp_path / n for n in bad], ctx))
    got = {Path(r.file).name: r.reason for r in log.items}
    assert got == {"data.yaml": "names and nc disagree: nc is 3 but 2 names",
                   "other.yaml": "bad names: ids must run 0..1 without gaps, got [0, 2]",
                   "obj.names": "empty class name: class id 1"}


def test_sniffing_claims_yolo_files_only(tmp_path):
    labels, other = tmp_path / "labels", tmp_path / "other"
    labels.mkdir()
    other.mkdir()
    cases = {labels / "a.txt": b"0 0.5 0.5 0.2 0.2\n1 0.1 0.1 0.05 0.05\n",
             labels / "empty.txt": b"", tmp_path / "data.yaml": b"nc: 1\nnames: ['a']\n",
             tmp_path / "classes.txt": b"cat\ndog\n", tmp_path / "obj.names": b"cat\n",
             tmp_path / "notes.txt": b"remember to relabel the dogs\n",
             other / "stray.txt": b"",
             labels / "bad.txt": b"x 0.5 0.5\n", tmp_path / "first.txt": b"0 .5 .5 .2 .2\n1\n", tmp_path / "README.roboflow.txt": b"0 1 2 3 4\n",
             tmp_path / "config.yaml": b"model: yolov8n\n"}
    for path, data in cases.items():
        path.write_bytes(data)
    claimed = {path.name for path, data in cases.items() if detect(path, data) == "yolo"}
    assert claimed == {"a.txt", "empty.txt", "bad.txt", "first.txt", "data.yaml",
                       "classes.txt", "obj.names"}


def test_unreadable_label_file_does_not_make_its_image_a_negative(tmp_path, sample):
    """Background means no label file; one that exists but cannot be read drops the image."""
    _, records = sample
    export = tmp_path / "yolo"
    for name in ("a", "b"):
        (export / "images").mkdir(parents=True, exist_ok=True)
        shutil.copy(records[0].source.uri, export / "images" / f"{name}.jpg")
    (export / "labels").mkdir()
    (export / "labels" / "a.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    (export / "labels" / "b.txt").write_bytes(b"0 0.5 0.5 0.2 0.2\xff\n")
    (export / "classes.txt").write_text("\n".join(CLASSES))
    summary = ingest([str(export)], tmp_path / "out")
    assert [Path(r.source.uri).name for r in manifest(tmp_path / "out")] == ["a.jpg"]
    got = {(Path(r["file"]).name, r["reason"].split(":")[0]) for r in rejections(tmp_path / "out")}
    assert got == {("b.txt", "not UTF-8 text"), ("b.jpg", "labels not read")}
    assert summary["images"] == 1


@pytest.mark.parametrize("layout", ["images/train", "labels/train", "."])
def test_images_root_holds_the_images_of_a_labels_only_export(tmp_path, sample, layout):
    """`--images-root`: labels/train/a.txt finds images/train/a.jpg, labels/train/a.jpg or
    a.jpg there, never a file outside it."""
    _, records = sample
    export, images = tmp_path / "labels-export", tmp_path / "images-root"
    (export / "labels" / "train").mkdir(parents=True)
    (export / "data.yaml").write_text(f"names: {json.dumps(CLASSES)}\n")
    (export / "labels" / "train" / "a.txt").write_text(
        "".join(yolo_line(records[0], b) + "\n" for b in records[0].boxes))
    (export / "labels" / "train" / "b.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    (images / layout).mkdir(parents=True, exist_ok=True)
    shutil.copy(records[0].source.uri, images / layout / "a.jpg")
    summary = ingest([str(export)], tmp_path / "out", images_root=str(images))
    (record,) = manifest(tmp_path / "out")
    assert record.source.uri == str((images / layout / "a.jpg").resolve())
    assert pixel_boxes(record.boxes, records[0].width, records[0].height) == \
        pixel_boxes(records[0].boxes, records[0].width, records[0].height)
    (missing,) = rejections(tmp_path / "out")
    assert missing["record"] == "file" and missing["reason"] == (
        f"missing image: no image named b.* in the images root {images}")
    assert summary["images"] == 1


def test_label_studio_yolo_export(tmp_path, sample):
    """Label Studio's YOLO export: classes.txt and notes.json at the root, images/, labels/."""
    _, records = sample
    export = tmp_path / "label-studio-yolo"
    for record in records[:3]:
        name = f"0a1b2c3d-{Path(record.source.uri).name}"  # uploads get a hash prefix
        (export / "images").mkdir(parents=True, exist_ok=True)
        (export / "labels").mkdir(exist_ok=True)
        shutil.copy(record.source.uri, export / "images" / name)
        (export / "labels" / f"{Path(name).stem}.txt").write_text(
            "".join(yolo_line(record, b) + "\n" for b in record.boxes))
    (export / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    (export / "notes.json").write_text(json.dumps({
        "categories": [{"id": i, "name": c} for i, c in enumerate(CLASSES)],
        "info": {"year": 2026, "version": "1.0", "contributor": "Label Studio"}}))
    summary = ingest([str(export)], tmp_path / "out")
    assert summary["images"] == 3 and summary["rejected"] == 0, rejections(tmp_path / "out")
    assert summary["ignored_files"] == [str(export / "notes.json")]
    truth = {f"0a1b2c3d-{Path(r.source.uri).name}": r for r in records[:3]}
    for mine in manifest(tmp_path / "out"):
        expected = truth[Path(mine.source.uri).name]
        assert pixel_boxes(mine.boxes, expected.width, expected.height) == \
            pixel_boxes(expected.boxes, expected.width, expected.height)
