"""CVAT XML, plain CSV and Open Images CSV parsers.

Realistic exports are written by the tests themselves from the synthetic VOC sample (its true
boxes read back through `ingest`), plus the real raccoon dataset (read-only, shared folder).
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import defusedxml.ElementTree as SafeET
import pytest
from PIL import Image

from odapi_operators.core.data import formats, sample_data
from odapi_operators.core.data.formats import ParseContext, csvboxes, cvat, openimages
from odapi_operators.core.data.ingest import ingest
from odapi_operators.core.data.manifest import ImageSource, key_from_url, read_manifest
from odapi_operators.core.rejections import RejectionLog, StageError

RACCOON = Path(__file__).resolve().parents[3] / "shared" / "datasets" / "raccoon"
PLUGINS = Path(__file__).resolve().parents[2] / "plugins"

needs_csv_registry = pytest.mark.skipif(
    "csv" not in formats.AVAILABLE,
    reason="format 'csv' (module csvboxes) is not registered in formats.AVAILABLE yet")

MIDS = {"circle": "/m/0c1rcl", "square": "/m/0sq4re", "triangle": "/g/11tr1ang"}
BOX_HEADER = ("ImageID,Source,LabelName,Confidence,XMin,XMax,YMin,YMax,IsOccluded,"
              "IsTruncated,IsGroupOf,IsDepiction,IsInside")
INDEX_HEADER = ("ImageID,Subset,OriginalURL,OriginalLandingURL,License,AuthorProfileURL,"
                "Author,Title,OriginalSize,OriginalMD5,Thumbnail300KURL,Rotation")


# -- shared helpers -----------------------------------------------------------------------------

def manifest(out: Path):
    return list(read_manifest(out / "manifest.jsonl"))


def rejections(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "rejections.jsonl").read_text().splitlines()]


def by_key(records) -> dict:
    return {r.key: r for r in records}


def boxes_of(records) -> dict:
    return {r.key: sorted((b.label, b.xmin, b.ymin, b.xmax, b.ymax) for b in r.boxes)
            for r in records}


def context(export_root: Path, images_root: Path | None = None, **options) -> ParseContext:
    return ParseContext(export_root=Path(export_root), images_root=images_root,
                        log=RejectionLog(), options=options)


def reasons(log: RejectionLog) -> list[str]:
    return [r.reason for r in log.items]


def pixels(record, box) -> tuple[int, int, int, int]:
    """The sample's integer pixel box back from the normalized manifest box."""
    return (round(box.xmin * record.width), round(box.ymin * record.height),
            round(box.xmax * record.width), round(box.ymax * record.height))


def jpeg(path: Path, size=(100, 80)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (30, 120, 200)).save(path, "JPEG")
    return path


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    """(VOC export folder, generator summary, the VOC-ingested records by key)."""
    export = tmp_path_factory.mktemp("voc")
    gen = sample_data.generate(export, count=12, seed=7)
    out = tmp_path_factory.mktemp("voc-ingest") / "out"
    summary = ingest([str(export)], out)
    assert summary["images"] == 12 and summary["rejected"] == 0
    return export, gen, by_key(manifest(out))


# -- CVAT ---------------------------------------------------------------------------------------

def cvat_document(images: list[str], extra: str = "") -> str:
    return ('<?xml version="1.0" encoding="utf-8"?>\n<annotations>\n  <version>1.1</version>\n'
            '  <meta><task><id>7</id><name>shapes</name><mode>annotation</mode><labels>'
            '<label><name>circle</name><type>rectangle</type></label></labels></task>'
            '<dumped>2024-05-01 10:00:00.000000+00:00</dumped></meta>\n'
            + "\n".join(images) + extra + "\n</annotations>\n")


def cvat_image(index: int, name: str, width, height, shapes: str) -> str:
    return (f'  <image id="{index}" name="{name}" width="{width}" height="{height}">'
            f'{shapes}</image>')


def cvat_box(label, xtl, ytl, xbr, ybr, rotation=None) -> str:
    rot = f' rotation="{rotation}"' if rotation is not None else ""
    return (f'<box label="{label}" source="manual" occluded="0" xtl="{xtl}" ytl="{ytl}" '
            f'xbr="{xbr}" ybr="{ybr}" z_order="0"{rot}><attribute name="difficult">false'
            '</attribute></box>')


def cvat_from_sample(records: dict, prefix: str = "") -> str:
    images = []
    for i, (key, r) in enumerate(sorted(records.items())):
        shapes = "".join(cvat_box(b.label, *pixels(r, b)) for b in r.boxes)
        images.append(cvat_image(i, f"{prefix}{key}.jpg", r.width, r.height, shapes))
    return cvat_document(images)


@pytest.mark.parametrize("fmt", ["auto", "cvat"])
def test_cvat_export_gives_the_voc_boxes(sample, tmp_path, fmt):
    export, gen, voc = sample
    (tmp_path / "cvat").mkdir()
    (tmp_path / "cvat" / "annotations.xml").write_text(cvat_from_sample(voc))
    summary = ingest([str(tmp_path / "cvat")], tmp_path / "out", images_root=str(export),
                     fmt=fmt)
    records = manifest(tmp_path / "out")
    assert summary["images"] == len(records) == 12
    assert summary["boxes"] == gen["boxes"] and summary["rejected"] == 0
    assert boxes_of(records) == boxes_of(voc.values())
    for r in records:
        assert (r.width, r.height) == (voc[r.key].width, voc[r.key].height)
        assert r.source == voc[r.key].source and r.provenance["format"] == "cvat"


def test_cvat_images_in_a_subfolder_of_the_export(sample, tmp_path):
    export, _, voc = sample
    keys = sorted(voc)[:3]
    folder = tmp_path / "task"
    for key in keys:
        (folder / "images").mkdir(parents=True, exist_ok=True)
        (folder / "images" / f"{key}.jpg").write_bytes((export / f"{key}.jpg").read_bytes())
    (folder / "annotations.xml").write_text(
        cvat_from_sample({k: voc[k] for k in keys}, prefix="images/"))
    summary = ingest([str(folder)], tmp_path / "out")
    records = manifest(tmp_path / "out")
    assert summary["images"] == 3 and summary["rejected"] == 0
    assert [r.key for r in records] == [f"images__{k}" for k in keys]
    assert [r.source_id for r in records] == [f"images/{k}.jpg" for k in keys]


def test_cvat_rotated_box_becomes_its_envelope(tmp_path):
    jpeg(tmp_path / "a.jpg", (200, 100))
    shapes = "".join([
        cvat_box("car", 50, 40, 90, 60, rotation=90),      # 40x20 about (70, 50)
        cvat_box("car", 50, 40, 90, 60, rotation=30),
        cvat_box("car", 50, 40, 90, 60, rotation=180),     # a half turn changes nothing
        cvat_box("car", 150, 60, 210, 100, rotation=45),   # corners leave the image: clipped
    ])
    (tmp_path / "ann.xml").write_text(cvat_document([cvat_image(0, "a.jpg", 200, 100, shapes)]))
    ctx = context(tmp_path)
    [record] = cvat.parse([tmp_path / "ann.xml"], ctx)
    assert ctx.log.items == []
    quarter, thirty, half, clipped = record.boxes
    # 90 deg: the 40x20 box about (70, 50) becomes 20x40: (60, 30)-(80, 70), exactly.
    assert (quarter.xmin, quarter.ymin, quarter.xmax, quarter.ymax) == (0.3, 0.3, 0.4, 0.7)
    # 30 deg: half sides 20 and 10 -> 20cos30 + 10sin30 = 22.3205, 20sin30 + 10cos30 = 18.6603
    assert thirty.xmin == pytest.approx((70 - 22.320508) / 200)
    assert thirty.xmax == pytest.approx((70 + 22.320508) / 200)
    assert thirty.ymin == pytest.approx((50 - 18.660254) / 100)
    assert thirty.ymax == pytest.approx((50 + 18.660254) / 100)
    assert (half.xmin, half.ymin, half.xmax, half.ymax) == (0.25, 0.4, 0.45, 0.6)
    # 45 deg about (180, 80), half sides 30, 20: half extents 35.355 both ways, clipped to
    # the image: x 144.645..200, y 44.645..100.
    assert clipped.xmin == pytest.approx((180 - 35.355339) / 200) and clipped.xmax == 1.0
    assert clipped.ymin == pytest.approx((80 - 35.355339) / 100) and clipped.ymax == 1.0


def test_cvat_rotated_box_with_centre_outside_is_refused(tmp_path):
    jpeg(tmp_path / "a.jpg", (200, 100))
    shapes = cvat_box("car", 300, 10, 340, 30, rotation=10) + cvat_box("car", 10, 10, 40, 30)
    (tmp_path / "ann.xml").write_text(cvat_document([cvat_image(0, "a.jpg", 200, 100, shapes)]))
    ctx = context(tmp_path)
    [record] = cvat.parse([tmp_path / "ann.xml"], ctx)
    assert len(record.boxes) == 1
    assert [r.split(":")[0] for r in reasons(ctx.log)] == ["box outside the image"]


def test_cvat_polygons_and_other_shapes_are_reported(tmp_path):
    jpeg(tmp_path / "a.jpg")
    jpeg(tmp_path / "b.jpg")
    jpeg(tmp_path / "c.jpg")
    a = (cvat_box("cat", 10, 10, 50, 40)
         + '<polygon label="cat" occluded="0" points="1.0,2.0;30.5,4.0;20.0,40.0" z_order="0"/>'
         + '<points label="eye" occluded="0" points="5.0,5.0" z_order="0"/>'
         + '<tag label="indoor" source="manual"/>')
    b = '<polyline label="cat" occluded="0" points="1,1;9,9" z_order="0"/>'
    track = ('<track id="0" label="cat" source="manual"><box frame="0" keyframe="1" '
             'outside="0" occluded="0" xtl="1" ytl="1" xbr="9" ybr="9" z_order="0"/></track>')
    (tmp_path / "ann.xml").write_text(cvat_document(
        [cvat_image(0, "a.jpg", 100, 80, a), cvat_image(1, "b.jpg", 100, 80, b),
         cvat_image(2, "c.jpg", 100, 80, "")], extra=track))
    summary = ingest([str(tmp_path / "ann.xml")], tmp_path / "out")
    assert summary["images"] == 2 and summary["boxes"] == 1  # c.jpg kept as a negative
    assert [r.key for r in manifest(tmp_path / "out")] == ["a", "c"]
    assert summary["rejections_by_reason"] == {"not a box": 5, "no usable box": 1}
    got = sorted(r["reason"] for r in rejections(tmp_path / "out"))
    assert got == sorted([
        "not a box: polygon labelled 'cat'", "not a box: points labelled 'eye'",
        "not a box: tag labelled 'indoor'", "not a box: polyline labelled 'cat'",
        "not a box: track (CVAT for video; export as CVAT for images 1.1)",
        "no usable box: image dropped, all 1 shapes refused"])


def test_cvat_bad_numbers_and_sizes_are_reported(tmp_path):
    jpeg(tmp_path / "a.jpg")
    jpeg(tmp_path / "b.jpg")
    a = (cvat_box("cat", "ten", 10, 50, 40) + cvat_box("cat", 10, 10, 50, 40)
         + '<box label="cat" xtl="1" ytl="1" xbr="5"/>' + cvat_box("", 1, 1, 9, 9))
    (tmp_path / "ann.xml").write_text(cvat_document(
        [cvat_image(0, "a.jpg", 100, 80, a), cvat_image(1, "b.jpg", 0, 80, "")]))
    ctx = context(tmp_path)
    [record] = cvat.parse([tmp_path / "ann.xml"], ctx)
    assert len(record.boxes) == 1
    assert reasons(ctx.log) == ["not a number: xtl is 'ten'", "missing attribute: ybr",
                                "empty class name",
                                "invalid image size: 0x80 (width and height must be whole "
                                "pixels from 1 to 65535)"]


def test_cvat_malformed_xml_is_refused_whole(tmp_path):
    jpeg(tmp_path / "a.jpg")
    good = cvat_document([cvat_image(0, "a.jpg", 100, 80, cvat_box("cat", 1, 1, 50, 40))])
    (tmp_path / "good.xml").write_text(good)
    (tmp_path / "truncated.xml").write_text(good[: good.index("</image>") + 10])
    (tmp_path / "broken.xml").write_text(good.replace("</image>", "</imag>"))
    (tmp_path / "other.xml").write_text("<annotationz><x/></annotationz><!-- <annotations -->")
    ctx = context(tmp_path)
    records = list(cvat.parse(sorted(tmp_path.glob("*.xml")), ctx))
    assert [r.key for r in records] == ["a"]
    got = {Path(r.file).name: r.reason for r in ctx.log.items}
    assert got["truncated.xml"].startswith("not well-formed XML: unclosed token")
    assert got["truncated.xml"].endswith("1 images before the error dropped")
    assert got["broken.xml"].startswith("not well-formed XML: mismatched tag")
    assert got["other.xml"] == ("not a CVAT for images annotation: root element "
                                "<annotationz>")
    assert len(ctx.log) == 3


XXE = """<?xml version="1.0"?>
<!DOCTYPE annotations [<!ENTITY secret SYSTEM "file://{secret}">]>
<annotations><version>1.1</version>
<image id="0" name="a.jpg" width="100" height="80"><box label="&secret;" xtl="1" ytl="1"
 xbr="9" ybr="9"/></image></annotations>
"""
LAUGHS = """<?xml version="1.0"?>
<!DOCTYPE annotations [<!ENTITY lol "lol"><!ENTITY lol1 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
<!ENTITY lol2 "&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;">
<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">]>
<annotations><image id="0" name="a.jpg" width="100" height="80"><box label="&lol3;" xtl="1"
 ytl="1" xbr="9" ybr="9"/></image></annotations>
"""


def test_cvat_xxe_and_billion_laughs_are_refused(tmp_path):
    jpeg(tmp_path / "a.jpg")
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET")
    (tmp_path / "xxe.xml").write_text(XXE.format(secret=secret))
    (tmp_path / "laughs.xml").write_text(LAUGHS)
    assert formats.detect(tmp_path / "xxe.xml", (tmp_path / "xxe.xml").read_bytes()) == "cvat"
    with pytest.raises(StageError, match="forbidden XML construct"):
        ingest([str(tmp_path)], tmp_path / "out")
    got = sorted((Path(r["file"]).name, r["reason"].split(":")[0])
                 for r in rejections(tmp_path / "out"))
    assert got == [("laughs.xml", "forbidden XML construct"),
                   ("xxe.xml", "forbidden XML construct")]
    assert "TOP-SECRET" not in (tmp_path / "out" / "rejections.jsonl").read_text()


def test_cvat_path_traversal_is_refused(tmp_path):
    export = tmp_path / "export"
    jpeg(export / "ok.jpg")
    jpeg(tmp_path / "outside.jpg")  # exists, but is not inside the export
    (export / "ann.xml").write_text(cvat_document([
        cvat_image(0, "../outside.jpg", 100, 80, cvat_box("cat", 1, 1, 9, 9)),
        cvat_image(1, "/etc/passwd", 100, 80, cvat_box("cat", 1, 1, 9, 9)),
        cvat_image(2, "ok.jpg", 100, 80, cvat_box("cat", 1, 1, 9, 9))]))
    summary = ingest([str(export)], tmp_path / "out")
    assert summary["images"] == 1 and [r.key for r in manifest(tmp_path / "out")] == ["ok"]
    assert summary["rejections_by_reason"] == {"path outside the allowed root": 1,
                                               "absolute path refused": 1}


# -- plain CSV ----------------------------------------------------------------------------------

def csv_filename_layout(records: dict) -> str:
    lines = ["filename,width,height,class,xmin,ymin,xmax,ymax"]
    for key, r in sorted(records.items()):
        lines += [f"{key}.jpg,{r.width},{r.height},{b.label},{','.join(map(str, pixels(r, b)))}"
                  for b in r.boxes]
    return "\n".join(lines) + "\n"


def csv_path_layout(records: dict) -> str:
    lines = ["path,xmin,ymin,xmax,ymax,label"]
    for key, r in sorted(records.items()):
        lines += [f"{key}.jpg,{','.join(map(str, pixels(r, b)))},{b.label}" for b in r.boxes]
    return "\r\n".join(lines) + "\r\n"


def test_csv_sniffs_only_its_two_headers(tmp_path):
    heads = {
        "filename,width,height,class,xmin,ymin,xmax,ymax\nx.jpg,1,1,a,0,0,1,1\n": "csv",
        "\ufeffPath, xmin, ymin, xmax, ymax, Label\r\n": "csv",
        "image,label,x1,y1,x2,y2\n": None,
        BOX_HEADER + "\n": "openimages",
        "/m/0199g,Bicycle\n": "openimages",
        "LabelName,DisplayName\n/m/0199g,Bicycle\n": "openimages",
    }
    for head, expected in heads.items():
        data = head.encode("utf-8")
        assert formats.detect(tmp_path / "x.csv", data) == expected, head
    assert not csvboxes.sniff(tmp_path / "x.csv", BOX_HEADER.encode())
    assert not openimages.sniff(tmp_path / "x.csv", b"filename,width,height,class,xmin,ymin,"
                                                    b"xmax,ymax\n")


def test_csv_filename_layout_gives_the_voc_boxes(sample, tmp_path):
    export, gen, voc = sample
    (tmp_path / "labels.csv").write_text(csv_filename_layout(voc))
    ctx = context(tmp_path, export)
    records = list(csvboxes.parse([tmp_path / "labels.csv"], ctx))
    assert ctx.log.items == []
    assert len(records) == 12 and sum(len(r.boxes) for r in records) == gen["boxes"]
    assert boxes_of(records) == boxes_of(voc.values())
    assert [r.key for r in records] == sorted(voc)  # order of first appearance
    for r in records:
        assert (r.width, r.height) == (voc[r.key].width, voc[r.key].height)
        assert r.source == voc[r.key].source and r.provenance["format"] == "csv"


def test_csv_path_layout_reads_the_size_from_the_image(sample, tmp_path):
    export, gen, voc = sample
    (tmp_path / "boxes.csv").write_text(csv_path_layout(voc))
    ctx = context(tmp_path, export)
    records = list(csvboxes.parse([tmp_path / "boxes.csv"], ctx))
    assert ctx.log.items == []
    assert boxes_of(records) == boxes_of(voc.values())
    assert {r.key: (r.width, r.height) for r in records} == {
        k: (r.width, r.height) for k, r in voc.items()}


def test_csv_mapped_columns_pixels_and_normalized(sample, tmp_path):
    export, _, voc = sample
    lines = ["Image File,Note,Object,X1,Y1,X2,Y2,W,H"]
    lines += [f"{k}.jpg,z,{b.label},{','.join(map(str, pixels(r, b)))},{r.width},{r.height}"
              for k, r in sorted(voc.items()) for b in r.boxes]
    (tmp_path / "custom.csv").write_text("\n".join(lines) + "\n")
    mapping = {"image": "image file", "label": "Object", "xmin": "X1", "ymin": "Y1",
               "xmax": "X2", "ymax": "Y2", "width": "W", "height": "H"}
    ctx = context(tmp_path, export, csv_columns=mapping)
    records = list(csvboxes.parse([tmp_path / "custom.csv"], ctx))
    assert ctx.log.items == [] and boxes_of(records) == boxes_of(voc.values())

    lines = ["file,left,top,right,bottom,kind"]
    lines += [f"{k}.jpg,{b.xmin!r},{b.ymin!r},{b.xmax!r},{b.ymax!r},{b.label}"
              for k, r in sorted(voc.items()) for b in r.boxes]
    (tmp_path / "norm.csv").write_text("\n".join(lines) + "\n")
    mapping = {"image": "file", "label": "kind", "xmin": "left", "ymin": "top",
               "xmax": "right", "ymax": "bottom"}
    ctx = context(tmp_path, export, csv_columns=mapping, csv_normalized=True)
    records = list(csvboxes.parse([tmp_path / "norm.csv"], ctx))
    assert ctx.log.items == [] and boxes_of(records) == boxes_of(voc.values())
    assert {(r.width, r.height) for r in records} == {(None, None)}


def test_csv_bad_column_mapping_is_reported(tmp_path):
    (tmp_path / "x.csv").write_text("a,b\n1,2\n")
    for mapping, reason in [
        ({"image": "a"},
         "bad exports.csv_columns: no column given for label, xmin, ymin, xmax, ymax"),
        ({"image": "a", "label": "b", "xmin": "a", "ymin": "a", "xmax": "a", "ymax": "q"},
         "bad exports.csv_columns: column 'q' (for ymax) is not in the header 'a,b'"),
        ({"picture": "a"}, "bad exports.csv_columns: unknown key(s) picture; expected image, "
                           "label, xmin, ymin, xmax, ymax, width, height"),
        (None, "unrecognised CSV header"),
    ]:
        ctx = context(tmp_path, csv_columns=mapping)
        assert list(csvboxes.parse([tmp_path / "x.csv"], ctx)) == []
        assert len(ctx.log) == 1 and ctx.log.items[0].reason.startswith(reason)


def write_rows(path: Path, rows: list[str], header="filename,width,height,class,xmin,ymin,"
               "xmax,ymax", bom: bool = False) -> Path:
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"")
                     + ("\n".join([header, *rows]) + "\n").encode("utf-8"))
    return path


def test_csv_bom_is_tolerated(tmp_path):
    jpeg(tmp_path / "a.jpg")
    path = write_rows(tmp_path / "bom.csv", ["a.jpg,100,80,cat,10,8,50,40"], bom=True)
    assert formats.detect(path, path.read_bytes()) == "csv"
    ctx = context(tmp_path)
    [record] = csvboxes.parse([path], ctx)
    assert ctx.log.items == [] and record.key == "a"
    assert (record.boxes[0].label, record.boxes[0].xmin, record.boxes[0].ymax) == ("cat", .1, .5)


def test_csv_stray_quote_is_reported_or_tolerated(tmp_path):
    jpeg(tmp_path / "a.jpg")
    path = write_rows(tmp_path / "q.csv", [
        'a.jpg,100,80,cat,10,8,50,40',
        '"a.jpg,100,80,cat,1,1,5,5',            # line 3: unbalanced quote, this line only
        'a.jpg,100,80,12" pipe,20,20,60,60',     # line 4: a quote inside a field is kept
        'a.jpg,100,80,"dog, brown",30,30,70,70',  # line 5: a quoted comma
        'a.jpg,100,80,"cat"x,1,1,5,5',           # line 6: text after a closing quote
    ])
    ctx = context(tmp_path)
    [record] = csvboxes.parse([path], ctx)
    assert [b.label for b in record.boxes] == ["cat", '12" pipe', "dog, brown"]
    assert [(r.record, r.reason) for r in ctx.log.items] == [
        ("line 3", "stray quote: unexpected end of data"),
        ("line 6", "stray quote: ',' expected after '\"'")]


def test_csv_wrong_column_count_and_non_numeric_rows(tmp_path):
    jpeg(tmp_path / "a.jpg")
    jpeg(tmp_path / "b.jpg")
    path = write_rows(tmp_path / "bad.csv", [
        "a.jpg,100,80,cat,10,8,50,40",
        "a.jpg,100,80,cat,10,8,50",           # line 3
        "",                                    # blank lines are skipped
        "b.jpg,100,80,cat,ten,8,50,40",       # line 5
        "b.jpg,100,eighty,cat,10,8,50,40",    # line 6
        "a.jpg,100,80,cat,10,8,500,40",       # line 7: outside the image
        ",100,80,cat,10,8,50,40",             # line 8
    ])
    ctx = context(tmp_path)
    [record] = csvboxes.parse([path], ctx)
    assert record.key == "a" and len(record.boxes) == 1
    got = [(r.record, r.reason.split(":")[0]) for r in ctx.log.items]
    assert got == [("line 3", "wrong column count"), ("line 5", "not a number"),
                   ("line 6", "not a number"), ("line 7", "box outside the image"),
                   ("line 8", "missing value"), ("line 5: image b.jpg", "no usable box")]
    assert ctx.log.items[0].reason == "wrong column count: expected 8 fields, got 7"
    assert ctx.log.items[1].reason == "not a number: xmin is 'ten'"


def test_csv_conflicting_sizes_drop_the_image(tmp_path):
    jpeg(tmp_path / "a.jpg")
    jpeg(tmp_path / "b.jpg")
    path = write_rows(tmp_path / "sizes.csv", [
        "a.jpg,100,80,cat,10,8,50,40", "b.jpg,100,80,cat,1,1,9,9",
        "a.jpg,640,480,cat,10,8,50,40", "a.jpg,100,80,cat,1,1,9,9"])
    ctx = context(tmp_path)
    assert [r.key for r in csvboxes.parse([path], ctx)] == ["b"]
    assert reasons(ctx.log) == ["conflicting size: 640x480 at line 4, 100x80 at line 2 "
                                "(1 more rows of it ignored)"]


def test_csv_negative_rows_urls_and_unreadable_images(tmp_path):
    jpeg(tmp_path / "a.jpg")
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    path = write_rows(tmp_path / "mixed.csv", [
        "a.jpg,100,80,,,,,",                                       # an image without objects
        "http://127.0.0.1/img/x.jpg,200,100,cat,20,10,100,50",
        "https://127.0.0.1/img/x.jpg?sig=1,200,100,cat,20,10,100,50"])
    ctx = context(tmp_path)
    a, x, signed = csvboxes.parse([path], ctx)
    assert ctx.log.items == []
    assert (a.key, a.boxes) == ("a", ())
    assert x.source == ImageSource("url", "http://127.0.0.1/img/x.jpg")
    assert x.key == key_from_url("http://127.0.0.1/img/x.jpg") != signed.key
    assert (x.boxes[0].xmin, x.boxes[0].ymax) == (0.1, 0.5)

    path = write_rows(tmp_path / "sizeless.csv", [
        "broken.jpg,1,1,8,8,cat", "missing.jpg,1,1,8,8,cat", "a.jpg,1,1,8,8,cat",
        "http://127.0.0.1/img/x.jpg,1,1,8,8,cat"], header="path,xmin,ymin,xmax,ymax,label")
    ctx = context(tmp_path)
    assert [r.key for r in csvboxes.parse([path], ctx)] == ["a"]
    assert [r.split(":")[0] for r in reasons(ctx.log)] == [
        "unreadable image", "missing image", "unknown image size"]


def test_csv_path_traversal_is_refused(tmp_path):
    export = tmp_path / "export"
    jpeg(export / "ok.jpg")
    jpeg(tmp_path / "outside.jpg")
    path = write_rows(export / "t.csv", ["../outside.jpg,100,80,cat,1,1,9,9",
                                         "/etc/passwd,100,80,cat,1,1,9,9",
                                         "ok.jpg,100,80,cat,1,1,9,9"])
    ctx = context(export)
    assert [r.key for r in csvboxes.parse([path], ctx)] == ["ok"]
    assert [r.split(":")[0] for r in reasons(ctx.log)] == ["path outside the allowed root",
                                                           "absolute path refused"]


@needs_csv_registry
def test_csv_through_ingest_auto_and_explicit(sample, tmp_path):
    export, gen, voc = sample
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "labels.csv").write_text(csv_filename_layout(voc))
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "boxes.csv").write_text(csv_path_layout(voc))
    for folder, fmt in [("a", "auto"), ("a", "csv"), ("b", "auto")]:
        out = tmp_path / f"out-{folder}-{fmt}"
        summary = ingest([str(tmp_path / folder)], out, images_root=str(export), fmt=fmt)
        assert (summary["images"], summary["boxes"], summary["rejected"]) == (
            12, gen["boxes"], 0)
        assert boxes_of(manifest(out)) == boxes_of(voc.values())


@needs_csv_registry
def test_csv_custom_header_needs_explicit_format(sample, tmp_path):
    export, gen, voc = sample
    (tmp_path / "c").mkdir()
    lines = ["img,cls,x0,y0,x1,y1"] + [
        f"{k}.jpg,{b.label},{','.join(map(str, pixels(r, b)))}"
        for k, r in sorted(voc.items()) for b in r.boxes]
    (tmp_path / "c" / "custom.csv").write_text("\n".join(lines) + "\n")
    options = {"csv_columns": {"image": "img", "label": "cls", "xmin": "x0", "ymin": "y0",
                               "xmax": "x1", "ymax": "y1"}}
    with pytest.raises(StageError, match="no annotation files found"):
        ingest([str(tmp_path / "c")], tmp_path / "auto", images_root=str(export),
               options=options)
    summary = ingest([str(tmp_path / "c")], tmp_path / "out", images_root=str(export),
                     fmt="csv", options=options)
    assert (summary["images"], summary["boxes"], summary["rejected"]) == (12, gen["boxes"], 0)
    assert boxes_of(manifest(tmp_path / "out")) == boxes_of(voc.values())


# -- the real raccoon dataset -------------------------------------------------------------------

@pytest.fixture(scope="module")
def raccoon():
    if not (RACCOON / "annotations").is_dir() or not (RACCOON / "images").is_dir():
        pytest.skip(f"raccoon dataset not found at {RACCOON} (annotations/ and images/)")
    found = sorted((RACCOON / "data").glob("*.csv"))
    if len(found) != 1:
        pytest.skip(f"expected one CSV in {RACCOON / 'data'}, found {found}")
    xmls = sorted((RACCOON / "annotations").glob("*.xml"))
    objects = sum(len(SafeET.parse(str(x)).getroot().findall("object")) for x in xmls)
    return found[0], len(xmls), objects


def test_raccoon_csv_matches_its_voc_annotations(raccoon, tmp_path):
    csv_file, images, objects = raccoon
    assert (images, objects) == (200, 217)  # the published dataset; counted from its XMLs
    voc_summary = ingest([str(RACCOON / "annotations")], tmp_path / "voc",
                         images_root=str(RACCOON / "images"))
    assert (voc_summary["images"], voc_summary["boxes"]) == (images, objects)
    ctx = context(csv_file.parent, RACCOON / "images")
    records = list(csvboxes.parse([csv_file], ctx))
    assert ctx.log.items == []
    assert (len(records), sum(len(r.boxes) for r in records)) == (images, objects)
    voc = manifest(tmp_path / "voc")
    assert boxes_of(records) == boxes_of(voc)
    assert {r.key: (r.width, r.height) for r in records} == {
        r.key: (r.width, r.height) for r in voc}


@needs_csv_registry
def test_raccoon_csv_through_ingest(raccoon, tmp_path):
    csv_file, images, objects = raccoon
    summary = ingest([str(csv_file.parent)], tmp_path / "csv",
                     images_root=str(RACCOON / "images"))
    assert (summary["images"], summary["boxes"], summary["rejected"]) == (images, objects, 0)
    assert summary["classes"] == {"raccoon": objects}
    voc_summary = ingest([str(RACCOON / "annotations")], tmp_path / "voc",
                         images_root=str(RACCOON / "images"))
    assert boxes_of(manifest(tmp_path / "csv")) == boxes_of(manifest(tmp_path / "voc"))
    assert summary["fingerprint"] == voc_summary["fingerprint"]


# -- Open Images --------------------------------------------------------------------------------

def oi_box_rows(records: dict) -> list[str]:
    return [f"{key},xclick,{MIDS[b.label]},1,{b.xmin!r},{b.xmax!r},{b.ymin!r},{b.ymax!r},"
            "0,0,0,0,0" for key, r in sorted(records.items()) for b in r.boxes]


def oi_descriptions() -> str:
    return "".join(f"{mid},{name}\n" for name, mid in MIDS.items()) + "/m/0dog,Dog\n"


def oi_index_rows(records: dict, export: Path, rotations: dict | None = None) -> list[str]:
    rows = []
    for key in sorted(records):
        md5 = base64.b64encode(hashlib.md5((export / f"{key}.jpg").read_bytes()).digest())
        rotation = (rotations or {}).get(key, "0")
        rows.append(f'{key},train,http://127.0.0.1:8000/img/{key}.jpg,'
                    f'https://www.flickr.com/photos/x/{key},'
                    f'https://creativecommons.org/licenses/by/2.0/,https://www.flickr.com/'
                    f'people/x/,"Doe, Jane","A title, with commas",123456,{md5.decode()},'
                    f'https://c1.staticflickr.com/{key}_z.jpg,{rotation}')
    return rows


def write_oi(folder: Path, records: dict, index_export: Path | None = None,
             rotations: dict | None = None, boxes: list[str] | None = None) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    files = {"boxes": folder / "train-annotations-bbox.csv",
             "descriptions": folder / "class-descriptions-boxable.csv"}
    files["boxes"].write_text("\n".join([BOX_HEADER, *(boxes or oi_box_rows(records))]) + "\n")
    files["descriptions"].write_text(oi_descriptions())
    if index_export is not None:
        files["index"] = folder / "train-images-boxable-with-rotation.csv"
        files["index"].write_text("\n".join(
            [INDEX_HEADER, *oi_index_rows(records, index_export, rotations)]) + "\n")
    return files


@pytest.mark.parametrize("fmt", ["auto", "openimages"])
def test_openimages_local_images_give_the_voc_boxes(sample, tmp_path, fmt):
    export, gen, voc = sample
    write_oi(tmp_path / "oi", voc)
    summary = ingest([str(tmp_path / "oi")], tmp_path / "out", images_root=str(export),
                     fmt=fmt)
    records = manifest(tmp_path / "out")
    assert (summary["images"], summary["boxes"], summary["rejected"]) == (12, gen["boxes"], 0)
    assert boxes_of(records) == boxes_of(voc.values())
    for r in records:
        assert r.source == voc[r.key].source and r.source_id == r.key
        assert (r.width, r.height, r.md5, r.rotation) == (None, None, None, 0)


def test_openimages_companions_in_any_order(sample, tmp_path):
    export, gen, voc = sample
    files = write_oi(tmp_path / "oi", voc, index_export=export)
    outputs = []
    for order in itertools.permutations(files.values()):
        ctx = context(tmp_path / "oi", export)
        records = list(openimages.parse(list(order), ctx))
        assert ctx.log.items == []
        outputs.append([r.to_json() for r in records])
    assert len(outputs) == 6 and all(o == outputs[0] for o in outputs)
    assert len(outputs[0]) == 12


def test_openimages_index_urls_md5_and_rotation(sample, tmp_path):
    export, gen, voc = sample
    keys = sorted(voc)
    rotations = {keys[0]: "90", keys[1]: "270.0", keys[2]: "", keys[3]: "nan",
                 keys[4]: "180"}
    files = write_oi(tmp_path / "oi", voc, index_export=export, rotations=rotations)
    ctx = context(tmp_path / "oi")
    records = by_key(openimages.parse(list(files.values()), ctx))
    assert ctx.log.items == [] and sorted(records) == keys
    for key, r in records.items():
        assert r.source == ImageSource("url", f"http://127.0.0.1:8000/img/{key}.jpg")
        assert r.md5 == hashlib.md5((export / f"{key}.jpg").read_bytes()).hexdigest()
        assert r.provenance["index"].endswith(f"train-images-boxable-with-rotation.csv:"
                                              f"{keys.index(key) + 2}")
    # Open Images rotates counterclockwise; ImageRecord.rotation counts clockwise.
    assert [records[k].rotation for k in keys[:6]] == [270, 90, 0, 0, 180, 0]
    assert boxes_of(records.values()) == boxes_of(voc.values())


def test_openimages_bad_md5_rotation_and_url_are_reported(sample, tmp_path):
    export, _, voc = sample
    keys = sorted(voc)[:4]
    some = {k: voc[k] for k in keys}
    files = write_oi(tmp_path / "oi", some, index_export=export,
                     rotations={keys[1]: "45"})
    rows = files["index"].read_text().splitlines()
    rows[1] = rows[1].replace(rows[1].split(",")[-3], "not-base64!")  # OriginalMD5 of keys[0]
    rows[3] = rows[3].replace("http://127.0.0.1:8000", "ftp://127.0.0.1")
    files["index"].write_text("\n".join(rows) + "\n")
    hexed = hashlib.md5(b"x").hexdigest().upper()
    rows[4] = rows[4].replace(rows[4].split(",")[-3], hexed)
    files["index"].write_text("\n".join(rows) + "\n")
    ctx = context(tmp_path / "oi", export)
    records = list(openimages.parse(list(files.values()), ctx))
    assert [r.key for r in records] == [keys[3]] and records[0].md5 == hexed.lower()
    assert [r.split(":")[0] for r in reasons(ctx.log)] == [
        "invalid md5", "invalid rotation", "invalid URL"]


def test_openimages_image_without_url_or_file_is_rejected(sample, tmp_path):
    export, _, voc = sample
    keys = sorted(voc)[:3]
    jpeg(tmp_path / "outside.jpg")
    rows = oi_box_rows({k: voc[k] for k in keys}) + [
        "feedfacecafe0001,xclick,/m/0c1rcl,1,0.1,0.5,0.1,0.5,0,0,0,0,0",
        "../../outside,xclick,/m/0c1rcl,1,0.1,0.5,0.1,0.5,0,0,0,0,0"]
    files = write_oi(tmp_path / "oi", {keys[0]: voc[keys[0]]}, index_export=export, boxes=rows)
    ctx = context(tmp_path / "oi", export)
    records = by_key(openimages.parse(list(files.values()), ctx))
    # keys[0] has an index row (its URL), keys[1:] do not: found as <ImageID>.jpg in the
    # images root; the made-up ImageID is nowhere; a path-like one is not looked up.
    assert sorted(records) == keys
    assert records[keys[0]].source.kind == "url" and records[keys[0]].md5
    for key in keys[1:]:
        assert records[key].source == ImageSource("local", str(export.resolve() / f"{key}.jpg"))
        assert records[key].md5 is None
    # an unsorted boxes CSV is read in ImageID order: "../../outside" before "feedface..."
    assert reasons(ctx.log) == [
        f"path outside the allowed root: '../../outside.jpg' is not inside {export.resolve()}",
        "missing image: no URL or file for ImageID feedfacecafe0001 (no index row, no "
        f"{export.resolve() / 'feedfacecafe0001.jpg'})"]


def test_openimages_url_sources_through_ingest(sample, tmp_path):
    export, gen, voc = sample
    write_oi(tmp_path / "oi", voc, index_export=export)
    summary = ingest([str(tmp_path / "oi")], tmp_path / "out", fmt="auto")
    assert (summary["images"], summary["boxes"], summary["rejected"]) == (12, gen["boxes"], 0)
    records = manifest(tmp_path / "out")
    assert {r.source.kind for r in records} == {"url"}
    assert all(len(r.md5) == 32 for r in records)
    assert boxes_of(records) == boxes_of(voc.values())


def expected_subset(voc: dict, keep: set[str]):
    kept, partial, dropped = {}, 0, 0
    for key, r in voc.items():
        boxes = [b for b in r.boxes if b.label in keep]
        if not boxes:
            dropped += 1
        else:
            kept[key] = boxes
            partial += len(boxes) < len(r.boxes)
    return kept, partial, dropped


@pytest.mark.parametrize("classes", [["circle"], ["/m/0c1rcl"], ["Circle", "/g/11tr1ang"],
                                     ["square", "/m/0sq4re", "Raccoon"]])
def test_openimages_classes_subset(sample, tmp_path, classes):
    export, _, voc = sample
    write_oi(tmp_path / "oi", voc)
    names = {n for n, mid in MIDS.items() if n in {c.lower() for c in classes} or mid in classes}
    kept, partial, dropped = expected_subset(voc, names)
    assert kept and partial  # the sample has images with and without other classes
    summary = ingest([str(tmp_path / "oi")], tmp_path / "out", images_root=str(export),
                     options={"classes": classes})
    records = manifest(tmp_path / "out")
    assert summary["images"] == len(kept) and summary["boxes"] == sum(map(len, kept.values()))
    assert set(summary["classes"]) == names
    assert boxes_of(records) == {k: sorted((b.label, b.xmin, b.ymin, b.xmax, b.ymax)
                                           for b in v) for k, v in kept.items()}
    expected = {"class not selected": partial}
    if dropped:
        expected["no selected class"] = dropped
    if "Raccoon" in classes:
        expected["unknown selected class"] = 1
    assert summary["rejections_by_reason"] == expected
    example = next(r["reason"] for r in rejections(tmp_path / "out")
                   if r["reason"].startswith("class not selected"))
    key = next(k for k in kept if len(kept[k]) < len(voc[k].boxes))
    other = sorted({b.label for b in voc[key].boxes} - names)
    assert example.endswith(f" boxes ({', '.join(other)})")


def test_openimages_unknown_mid_is_reported(sample, tmp_path):
    export, _, voc = sample
    keys = sorted(voc)[:3]
    rows = oi_box_rows({k: voc[k] for k in keys})
    rows.insert(1, f"{keys[0]},xclick,/m/0n0tthere,1,0.1,0.5,0.1,0.5,0,0,0,0,0")
    rows.append("0000000000abcdef,xclick,/m/0n0tthere,1,0.1,0.5,0.1,0.5,0,0,0,0,0")
    files = write_oi(tmp_path / "oi", voc, boxes=rows)
    ctx = context(tmp_path / "oi", export)
    records = list(openimages.parse([files["descriptions"], files["boxes"]], ctx))
    assert [r.key for r in records] == keys
    # the last row makes the file unsorted: its images and reports come in ImageID order
    assert [(r.record, r.reason) for r in ctx.log.items] == [
        (f"line {len(rows) + 1}: ImageID 0000000000abcdef",
         "unknown MID: image dropped, 1 boxes with MID /m/0n0tthere not in the class "
         "descriptions"),
        (f"line 2: ImageID {keys[0]}", "unknown MID: 1 boxes with MID /m/0n0tthere not in "
                                       "the class descriptions")]


def test_openimages_malformed_rows_bom_and_quotes(sample, tmp_path):
    export, _, voc = sample
    keys = sorted(voc)[:2]
    rows = oi_box_rows({k: voc[k] for k in keys})
    n = len(rows)
    rows += [f"{keys[1]},xclick,/m/0c1rcl,1,0.1,0.5,0.1",                  # n+2: 7 columns
             f"{keys[1]},xclick,/m/0c1rcl,1,0.1,zero,0.1,0.5,0,0,0,0,0",   # n+3
             f'{keys[1]},"xclick,/m/0c1rcl,1,0.1,0.5,0.1,0.5,0,0,0,0,0',   # n+4: stray quote
             f'{keys[1]},"x, click",/m/0c1rcl,1,0.1,0.5,0.1,0.5,0,0,0,0,0',  # quoted comma: ok
             f"{keys[1]},xclick,/m/0c1rcl,1,0.5,0.1,0.1,0.5,0,0,0,0,0"]    # n+6: degenerate
    files = write_oi(tmp_path / "oi", voc, boxes=rows)
    for key in ("boxes", "descriptions"):
        files[key].write_bytes(b"\xef\xbb\xbf" + files[key].read_bytes())
        assert formats.detect(files[key], files[key].read_bytes()[:4096]) == "openimages"
    ctx = context(tmp_path / "oi", export)
    records = by_key(openimages.parse(list(files.values()), ctx))
    assert sorted(records) == keys
    assert len(records[keys[1]].boxes) == len(voc[keys[1]].boxes) + 1
    assert [(r.record, r.reason.split(":")[0]) for r in ctx.log.items] == [
        (f"line {n + 2}", "wrong column count"), (f"line {n + 3}", "not a number"),
        (f"line {n + 4}", "stray quote"), (f"line {n + 6}", "degenerate box")]
    assert ctx.log.items[1].reason == "not a number: XMax is 'zero'"


def comparable(records) -> dict:
    """Everything but the row order inside an image and the provenance line numbers."""
    return {r.key: (r.source, r.source_id, r.md5, r.rotation, r.width, r.height,
                    boxes_of([r])[r.key]) for r in records}


def test_openimages_unsorted_files_give_the_same_records(sample, tmp_path):
    export, _, voc = sample
    sorted_files = write_oi(tmp_path / "sorted", voc, index_export=export)
    ctx = context(tmp_path / "sorted", export)
    expected = comparable(openimages.parse(list(sorted_files.values()), ctx))
    assert ctx.log.items == [] and len(expected) == 12
    shuffled = write_oi(tmp_path / "shuffled", voc, index_export=export)
    for key in ("boxes", "index"):
        header, *rows = shuffled[key].read_text().splitlines()
        random.Random(3).shuffle(rows)
        shuffled[key].write_text("\n".join([header, *rows]) + "\n")
        assert not openimages._sorted_by_id(shuffled[key], 0)
    for files in ({**sorted_files, "index": shuffled["index"]}, shuffled):
        ctx = context(tmp_path / "shuffled", export)
        got = comparable(openimages.parse(list(files.values()), ctx))
        assert ctx.log.items == [] and got == expected


def test_openimages_unrecognised_companions_are_reported(sample, tmp_path):
    export, _, voc = sample
    files = write_oi(tmp_path / "oi", voc)
    labels = tmp_path / "oi" / "train-annotations-human-imagelabels.csv"
    labels.write_text("ImageID,Source,LabelName,Confidence\nabc,verification,/m/0c1rcl,1\n")
    v6 = tmp_path / "oi" / "oidv6-class-descriptions.csv"
    v6.write_text("LabelName,DisplayName\n/m/0dog,Dog\n")
    assert formats.detect(labels, labels.read_bytes()) == "openimages"
    ctx = context(tmp_path / "oi", export)
    records = list(openimages.parse([labels, v6, *files.values()], ctx))
    assert len(records) == 12
    assert [r.reason.split(":")[0] for r in ctx.log.items] == ["unrecognised Open Images CSV"]

    ctx = context(tmp_path / "oi", export)
    assert list(openimages.parse([files["boxes"]], ctx)) == []
    assert reasons(ctx.log) == ["missing class descriptions: no MID,Name CSV among the "
                                "export's files"]


# -- streaming ----------------------------------------------------------------------------------

MEASURE = textwrap.dedent("""
    import json, sys, time, tracemalloc
    from pathlib import Path
    sys.path.insert(0, sys.argv[1])
    from odapi_operators.core import external_sort
    from odapi_operators.core.data.formats import ParseContext, openimages
    from odapi_operators.core.rejections import RejectionLog
    files = [Path(p) for p in sys.argv[4:]]
    external_sort.MAX_BYTES = 16 << 20  # runs much smaller than the file: memory is the run's

    def status(field):  # kB; VmHWM is this process's own peak RSS (getrusage's ru_maxrss
        with open("/proc/self/status") as fh:  # is inherited from the parent on Linux)
            return next(int(l.split()[1]) for l in fh if l.startswith(field + ":")) * 1024

    def run():
        ctx = ParseContext(export_root=files[0].parent, images_root=None, log=RejectionLog())
        images = boxes = 0
        for record in openimages.parse(files, ctx):  # records are counted, not kept
            images += 1
            boxes += len(record.boxes)
        return images, boxes, len(ctx.log)

    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # reset the peak RSS to the current RSS
        before = status("VmRSS")
    except OSError:
        before = status("VmHWM")
    start = time.perf_counter()
    images, boxes, rejected = run()
    seconds = time.perf_counter() - start
    rss_growth = status("VmHWM") - before
    traced_peak = None
    if sys.argv[3] == "trace":
        tracemalloc.start()
        run()
        traced_peak = tracemalloc.get_traced_memory()[1]
    print(json.dumps({"images": images, "boxes": boxes, "rejected": rejected,
                      "seconds": seconds, "rss_growth": rss_growth,
                      "traced_peak": traced_peak, "label": sys.argv[2]}))
""")


def measure(label: str, files: list[Path], trace: bool) -> dict:
    """Parse in a fresh interpreter: time, own peak-RSS growth, optionally tracemalloc peak."""
    done = subprocess.run([sys.executable, "-c", MEASURE, str(PLUGINS), label,
                           "trace" if trace else "-", *map(str, files)],
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_openimages_streams_a_large_boxes_csv(tmp_path, capsys):
    images, per_image = 20_000, 30
    folder = tmp_path / "oi"
    folder.mkdir()
    rng = random.Random(0)
    mids = [f"/m/0cls{i:03d}" for i in range(50)]
    (folder / "class-descriptions-boxable.csv").write_text(
        "".join(f"{mid},Class {i}\n" for i, mid in enumerate(mids)))
    ids = [f"{rng.getrandbits(64):016x}" for _ in range(images)]
    ids.sort()
    rows = []
    for image_id in ids:
        for _ in range(per_image):
            x0, y0 = rng.random() * 0.5, rng.random() * 0.5
            rows.append(f"{image_id},xclick,{rng.choice(mids)},1,{x0:.6f},{x0 + 0.3:.6f},"
                        f"{y0:.6f},{y0 + 0.4:.6f},0,0,0,0,0\n")
    boxes_csv = folder / "train-annotations-bbox.csv"
    with open(boxes_csv, "w") as fh:
        fh.write(BOX_HEADER + "\n")
        fh.writelines(rows)
    index_csv = folder / "train-images-boxable-with-rotation.csv"
    with open(index_csv, "w") as fh:
        fh.write(INDEX_HEADER + "\n")
        fh.writelines(f"{i},train,http://127.0.0.1/{i}.jpg,,,,,,1000,"
                      f"{base64.b64encode(hashlib.md5(i.encode()).digest()).decode()},,0\n"
                      for i in ids)
    shuffled_csv = tmp_path / "shuffled" / "train-annotations-bbox.csv"
    shuffled_csv.parent.mkdir()
    rng.shuffle(rows)
    with open(shuffled_csv, "w") as fh:
        fh.write(BOX_HEADER + "\n")
        fh.writelines(rows)
    del rows
    size = boxes_csv.stat().st_size
    assert size > 45e6

    companions = [folder / "class-descriptions-boxable.csv", index_csv]
    streamed = measure("sorted", [boxes_csv, *companions], trace=True)
    grouped = measure("unsorted", [shuffled_csv, *companions], trace=False)
    with capsys.disabled():
        for m in (streamed, grouped):
            print(f"\n[openimages {m['label']}] {size / 1e6:.0f} MB, {m['boxes']} boxes / "
                  f"{m['images']} images in {m['seconds']:.1f} s: "
                  f"{m['images'] / m['seconds']:.0f} records/s, "
                  f"{m['boxes'] / m['seconds']:.0f} rows/s; peak RSS growth "
                  f"{m['rss_growth'] / 1e6:.1f} MB"
                  + (f", tracemalloc peak {m['traced_peak'] / 1e6:.2f} MB"
                     if m["traced_peak"] is not None else ""))
    for m in (streamed, grouped):
        assert (m["images"], m["boxes"], m["rejected"]) == (images, images * per_image, 0)
    # Sorted (Open Images' own order): one image in memory at a time.
    assert streamed["rss_growth"] < size / 10 and streamed["traced_peak"] < size / 20
    # Unsorted: sorted by ImageID in runs of external_sort.MAX_BYTES of rows (16 MB here),
    # spilled to disk and merged: the run size bounds memory, not the file size (the old
    # in-memory grouping grew ~0.9x the file; bench/ingest_openimages.py measures 15M boxes).
    assert grouped["rss_growth"] < size / 2
