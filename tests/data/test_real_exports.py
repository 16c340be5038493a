"""Exports as real annotation tools write them (issue 15, items 1, 2, 3, 5).

Each sample is small but laid out as the tool lays it out: a CVAT *project* export with
subsets, an Open Images download given file by file, a COCO file from CVAT/datumaro that
writes `categories` first, Open Images images stored per Subset next to the standard
companion CSVs. Every test goes through `ingest`, the door the CLI and the DAG use.
"""

from __future__ import annotations

import json
import subprocess
import sys
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


# -- 1. CVAT project export: subsets ----------------------------------------------------------

CVAT_PROJECT = """<?xml version="1.0" encoding="utf-8"?>
<annotations>
  <version>1.1</version>
  <meta>
    <project><id>4</id><name>pets</name>
      <labels><label><name>cat</name><type>rectangle</type></label>
              <label><name>dog</name><type>rectangle</type></label></labels>
      <tasks><task><id>11</id><name>train part</name><subset>Train</subset></task>
             <task><id>12</id><name>val part</name><subset>Validation</subset></task></tasks>
    </project>
    <dumped>2025-03-02 09:12:44.120331+00:00</dumped>
  </meta>
  <image id="0" name="0001.jpg" subset="Train" task_id="11" width="200" height="100">
    <box label="cat" occluded="0" xtl="10" ytl="10" xbr="60" ybr="50" z_order="0"/>
  </image>
  <image id="1" name="0002.jpg" subset="Train" task_id="11" width="200" height="100">
    <box label="dog" occluded="0" xtl="100" ytl="20" xbr="180" ybr="90" z_order="0"/>
  </image>
  <image id="2" name="0001.jpg" subset="Validation" task_id="12" width="100" height="100">
    <box label="dog" occluded="0" xtl="0" ytl="0" xbr="50" ybr="50" z_order="0"/>
    <box label="cat" occluded="0" xtl="50" ytl="50" xbr="100" ybr="100" z_order="0"/>
  </image>
</annotations>
"""


def cvat_project(folder: Path) -> Path:
    """CVAT's project export layout: annotations.xml and images/<subset>/<name>."""
    jpeg(folder / "images" / "Train" / "0001.jpg", (200, 100))
    jpeg(folder / "images" / "Train" / "0002.jpg", (200, 100))
    jpeg(folder / "images" / "Validation" / "0001.jpg", (100, 100), colour=(9, 9, 9))
    (folder / "annotations.xml").write_text(CVAT_PROJECT)
    return folder


@pytest.mark.parametrize("fmt", ["auto", "cvat"])
def test_cvat_project_export_keeps_every_subset(tmp_path, fmt):
    export = cvat_project(tmp_path / "project")
    summary = ingest([str(export)], tmp_path / "out", fmt=fmt)
    got = records(tmp_path / "out")
    assert summary["rejected"] == 0, rejections(tmp_path / "out")
    assert (summary["images"], summary["boxes"]) == (3, 4)
    by_source = {Path(r.source.uri).relative_to(export.resolve()).as_posix(): r
                 for r in got.values()}
    assert sorted(by_source) == ["images/Train/0001.jpg", "images/Train/0002.jpg",
                                 "images/Validation/0001.jpg"]
    train, val = by_source["images/Train/0001.jpg"], by_source["images/Validation/0001.jpg"]
    assert train.key != val.key and (train.source_id, val.source_id) == (
        "Train/0001.jpg", "Validation/0001.jpg")
    assert boxes(train) == [("cat", 0.05, 0.1, 0.3, 0.5)]
    assert (val.width, val.height) == (100, 100)
    assert boxes(val) == [("cat", 0.5, 0.5, 1.0, 1.0), ("dog", 0.0, 0.0, 0.5, 0.5)]


def test_cvat_project_subset_image_missing_or_escaping_is_reported(tmp_path):
    export = cvat_project(tmp_path / "project")
    (export / "images" / "Validation" / "0001.jpg").unlink()
    xml = CVAT_PROJECT.replace('name="0002.jpg" subset="Train"', 'name="0002.jpg" subset="../.."')
    (export / "annotations.xml").write_text(xml)
    summary = ingest([str(export)], tmp_path / "out")
    assert summary["images"] == 1
    found = {(r["record"], r["reason"].split(":", 1)[0]) for r in rejections(tmp_path / "out")}
    assert found == {("image[id=1 subset=../.. name=0002.jpg]", "path outside the allowed root"),
                     ("Validation/0001.jpg", "missing image")}
    missing = next(r for r in rejections(tmp_path / "out") if r["record"] == "Validation/0001.jpg")
    assert missing["reason"].endswith(str(export.resolve() / "images/Validation/0001.jpg"))


# -- 2 and 5. Open Images as downloaded: separate files, Subset folders, companions -------------

OI_BOXES = """\
ImageID,Source,LabelName,Confidence,XMin,XMax,YMin,YMax,IsOccluded,IsTruncated,IsGroupOf,\
IsDepiction,IsInside
000a1249af2bc5f0,xclick,/m/01g317,1,0.1,0.5,0.2,0.9,0,0,0,0,0
000a1249af2bc5f0,xclick,/m/0199g,1,0.55,0.95,0.3,0.8,1,0,0,0,0
0a7e8e6d1c5e1f23,activemil,/m/0199g,1,0.0,0.25,0.0,0.5,0,1,0,0,0
"""
OI_DESCRIPTIONS = "/m/01g317,Person\n/m/0199g,Bicycle\n/m/0k4j,Car\n"
OI_INDEX_HEADER = ("ImageID,Subset,OriginalURL,OriginalLandingURL,License,AuthorProfileURL,"
                   "Author,Title,OriginalSize,OriginalMD5,Thumbnail300KURL,Rotation")
OI_IMAGE_LABELS = ("ImageID,Source,LabelName,Confidence\n000a1249af2bc5f0,verification,"
                   "/m/01g317,1\n0a7e8e6d1c5e1f23,crowdsource-verification,/m/0k4j,0\n")
OI_SEGMENTATION = ("MaskPath,ImageID,LabelName,BoxID,BoxXMin,BoxXMax,BoxYMin,BoxYMax,"
                   "PredictedIoU,Clicks\n000a1249af2bc5f0_m01g317_1b2c.png,000a1249af2bc5f0,"
                   "/m/01g317,1b2c,0.1,0.5,0.2,0.9,0.8,0.3 0.4 1;0.2 0.5 1\n")
OI_EXPECTED = {
    "000a1249af2bc5f0": [("Bicycle", 0.55, 0.3, 0.95, 0.8), ("Person", 0.1, 0.2, 0.5, 0.9)],
    "0a7e8e6d1c5e1f23": [("Bicycle", 0.0, 0.0, 0.25, 0.5)],
}


def open_images(folder: Path, urls: bool = True) -> dict[str, Path]:
    """An Open Images download: boxes, class descriptions and image index CSVs (the index
    either with Flickr URLs or, for images kept locally, with empty OriginalURL)."""
    folder.mkdir(parents=True, exist_ok=True)
    subsets = {"000a1249af2bc5f0": "train", "0a7e8e6d1c5e1f23": "validation"}
    rows = [f"{image_id},{subset},"
            f"{f'https://farm3.staticflickr.com/1/{image_id}_o.jpg' if urls else ''},"
            f"https://www.flickr.com/photos/x/1,https://creativecommons.org/licenses/by/2.0/,"
            f'https://www.flickr.com/people/x/,"Doe, Jane",A title,123456,,,0'
            for image_id, subset in subsets.items()]
    files = {"boxes": folder / "oidv6-train-annotations-bbox.csv",
             "descriptions": folder / "class-descriptions-boxable.csv",
             "index": folder / "train-images-boxable-with-rotation.csv"}
    files["boxes"].write_text(OI_BOXES)
    files["descriptions"].write_text(OI_DESCRIPTIONS)
    files["index"].write_text("\n".join([OI_INDEX_HEADER, *rows]) + "\n")
    return files


@pytest.mark.parametrize("fmt", ["openimages", "auto"])
@pytest.mark.parametrize("order", [("boxes", "descriptions", "index"),
                                   ("descriptions", "index", "boxes"),
                                   ("index", "boxes", "descriptions")])
def test_openimages_companion_files_given_as_separate_inputs(tmp_path, fmt, order):
    files = open_images(tmp_path / "oi")
    summary = ingest([str(files[name]) for name in order], tmp_path / "out", fmt=fmt)
    got = records(tmp_path / "out")
    assert summary["rejected"] == 0, rejections(tmp_path / "out")
    assert {key: boxes(r) for key, r in got.items()} == OI_EXPECTED
    assert {r.source.kind for r in got.values()} == {"url"}


def test_openimages_companions_from_two_folders_are_one_export(tmp_path):
    files = open_images(tmp_path / "oi" / "boxes")
    moved = tmp_path / "oi" / "metadata" / files["descriptions"].name
    moved.parent.mkdir()
    files["descriptions"].rename(moved)
    summary = ingest([str(files["boxes"]), str(moved), str(files["index"])], tmp_path / "out")
    assert (summary["images"], summary["boxes"], summary["rejected"]) == (2, 3, 0)


def test_a_loose_file_that_is_no_export_is_still_refused(tmp_path):
    files = open_images(tmp_path / "oi")
    notes = tmp_path / "oi" / "notes.txt"
    notes.write_text("downloaded 2025-01-02\n")
    with pytest.raises(StageError, match=r"notes.txt: no annotation files found"):
        ingest([str(files["boxes"]), str(notes)], tmp_path / "out")


@pytest.mark.parametrize("fmt", ["openimages", "auto"])
def test_openimages_local_images_in_subset_folders(tmp_path, fmt):
    """Images kept as Open Images stores them, images/<Subset>/<ImageID>.jpg (or
    <Subset>/<ImageID>.jpg), are found through the index's Subset column."""
    open_images(tmp_path / "oi", urls=False)
    train = jpeg(tmp_path / "oi" / "images" / "train" / "000a1249af2bc5f0.jpg", (64, 48))
    val = jpeg(tmp_path / "oi" / "validation" / "0a7e8e6d1c5e1f23.jpg", (64, 48))
    summary = ingest([str(tmp_path / "oi")], tmp_path / "out", fmt=fmt)
    got = records(tmp_path / "out")
    assert summary["rejected"] == 0, rejections(tmp_path / "out")
    assert {key: boxes(r) for key, r in got.items()} == OI_EXPECTED
    assert got["000a1249af2bc5f0"].source.uri == str(train.resolve())
    assert got["0a7e8e6d1c5e1f23"].source.uri == str(val.resolve())


def test_openimages_subset_image_missing_names_where_it_looked(tmp_path):
    open_images(tmp_path / "oi", urls=False)
    jpeg(tmp_path / "oi" / "images" / "train" / "000a1249af2bc5f0.jpg", (64, 48))
    summary = ingest([str(tmp_path / "oi")], tmp_path / "out")
    assert summary["images"] == 1
    [missing] = rejections(tmp_path / "out")
    root = (tmp_path / "oi").resolve()
    assert missing["record"] == "line 4: ImageID 0a7e8e6d1c5e1f23"
    assert missing["reason"] == (
        "missing image: no URL or file for ImageID 0a7e8e6d1c5e1f23 (empty OriginalURL, no "
        f"{root / 'validation/0a7e8e6d1c5e1f23.jpg'} or "
        f"{root / 'images/validation/0a7e8e6d1c5e1f23.jpg'} or "
        f"{root / '0a7e8e6d1c5e1f23.jpg'})")


def test_openimages_subset_that_leaves_the_root_is_refused(tmp_path):
    """A Subset naming a folder outside the export is one bad record, reported; the other
    image still flows."""
    files = open_images(tmp_path / "oi", urls=False)
    jpeg(tmp_path / "oi" / "train" / "000a1249af2bc5f0.jpg", (64, 48))
    jpeg(tmp_path / "elsewhere" / "0a7e8e6d1c5e1f23.jpg", (64, 48))
    files["index"].write_text(files["index"].read_text().replace(",validation,",
                                                                 ",../elsewhere,"))
    summary = ingest([str(tmp_path / "oi")], tmp_path / "out")
    assert list(records(tmp_path / "out")) == ["000a1249af2bc5f0"]
    [refused] = rejections(tmp_path / "out")
    assert (refused["file"], refused["record"]) == (str(files["boxes"]),
                                                    "line 4: ImageID 0a7e8e6d1c5e1f23")
    assert refused["reason"].startswith("path outside the allowed root: "
                                        "'../elsewhere/0a7e8e6d1c5e1f23.jpg'")
    assert summary["rejected"] == 1


@pytest.mark.parametrize("fmt", ["openimages", "auto"])
@pytest.mark.parametrize("as_files", [False, True])
def test_openimages_standard_companions_are_skipped_with_a_note(tmp_path, fmt, as_files):
    files = open_images(tmp_path / "oi")
    labels = tmp_path / "oi" / "oidv6-train-annotations-human-imagelabels.csv"
    labels.write_text(OI_IMAGE_LABELS)
    masks = tmp_path / "oi" / "train-annotations-object-segmentation.csv"
    masks.write_text(OI_SEGMENTATION)
    inputs = [*map(str, files.values()), str(labels), str(masks)] if as_files \
        else [str(tmp_path / "oi")]
    summary = ingest(inputs, tmp_path / "out", fmt=fmt)
    assert summary["rejected"] == 0, rejections(tmp_path / "out")
    assert summary["images"] == 2 and summary["ignored_files"] == []
    assert summary["skipped_files"] == {
        str(labels): "Open Images image-level labels, no boxes to read (not a rejection)",
        str(masks): "Open Images segmentation masks, no boxes to read (not a rejection)"}


def test_openimages_companions_alone_are_no_export(tmp_path):
    (tmp_path / "oi").mkdir()
    (tmp_path / "oi" / "labels.csv").write_text(OI_IMAGE_LABELS)
    with pytest.raises(StageError, match="no annotation files found"):
        ingest([str(tmp_path / "oi")], tmp_path / "out")


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


def test_cli_ingest_of_open_images_files_one_by_one(tmp_path):
    """The command of the issue, in a real child process: `odapi ingest --format openimages
    boxes.csv class-descriptions.csv index.csv labels.csv`; the labels CSV is noted."""
    files = open_images(tmp_path / "oi")
    labels = tmp_path / "oi" / "oidv6-train-annotations-human-imagelabels.csv"
    labels.write_text(OI_IMAGE_LABELS)
    done = subprocess.run(
        [sys.executable, "-m", "odapi_operators", "ingest", "--format", "openimages",
         str(files["boxes"]), str(files["descriptions"]), str(files["index"]), str(labels),
         "--out", str(tmp_path / "out"), "--no-progress"],
        capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert (result["images"], result["boxes"], result["rejected"]) == (2, 3, 0)
    assert (f"skipped {labels}: Open Images image-level labels, no boxes to read"
            in done.stderr + done.stdout)
