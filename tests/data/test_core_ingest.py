"""ingest + Pascal VOC parsing: counts, provenance, hostile XML, bad paths, bad boxes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from odapi_operators.core.data import sample_data
from odapi_operators.core.data.ingest import ingest
from odapi_operators.core.data.manifest import key_from_path, read_manifest
from odapi_operators.core.failures import EXIT_CODES, Failure
from odapi_operators.core.rejections import StageError


def voc(filename: str, width: int = 100, height: int = 80, objects=(),
        path: str | None = None) -> str:
    objs = "".join(
        f"<object><name>{name}</name><bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin>"
        f"<xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>"
        for name, (x0, y0, x1, y1) in objects)
    path = path or f"/home/annotator/Desktop/{filename}"
    return (f"<annotation><folder>x</folder><filename>{filename}</filename><path>{path}</path>"
            f"<size><width>{width}</width><height>{height}</height><depth>3</depth></size>"
            f"{objs}</annotation>")


def add_pair(folder: Path, stem: str, width: int = 100, height: int = 80, objects=(),
             image: bool = True, filename: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    name = filename or f"{stem}.jpg"
    if image:
        Image.new("RGB", (width, height), (10, 200, 30)).save(folder / f"{stem}.jpg", "JPEG")
    xml = folder / f"{stem}.xml"
    xml.write_text(voc(name, width, height, objects))
    return xml


def rejections(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "rejections.jsonl").read_text().splitlines()]


def manifest(out: Path):
    return list(read_manifest(out / "manifest.jsonl"))


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    out = tmp_path_factory.mktemp("export")
    return out, sample_data.generate(out, count=12, seed=1)


def test_sample_counts_match_generator(sample, tmp_path):
    export, gen = sample
    summary = ingest([str(export)], tmp_path / "ingest")
    records = manifest(tmp_path / "ingest")
    assert summary["images"] == len(records) == gen["images"] == 12
    assert summary["boxes"] == sum(len(r.boxes) for r in records) == gen["boxes"]
    assert summary["classes"] == {k: v for k, v in gen["per_class"].items() if v}
    assert summary["rejected"] == 0 and rejections(tmp_path / "ingest") == []
    assert summary["ignored_files"] == []  # _SUCCESS marker is not "other"
    on_disk = json.loads((tmp_path / "ingest" / "summary.json").read_text())
    assert on_disk["fingerprint"] == summary["fingerprint"]


def test_sample_boxes_normalized_and_provenance(sample, tmp_path):
    export, _ = sample
    ingest([str(export)], tmp_path / "ingest")
    records = manifest(tmp_path / "ingest")
    assert [r.key for r in records] == [f"shapes_{i:05d}" for i in range(12)]
    for r in records:
        assert r.boxes
        for b in r.boxes:
            assert 0.0 <= b.xmin < b.xmax <= 1.0 and 0.0 <= b.ymin < b.ymax <= 1.0
            assert b.label in sample_data.CLASSES
        xml = export / f"{r.key}.xml"
        assert r.provenance["file"] == str(xml)
        assert r.provenance["format"] == "voc"
        with Image.open(r.source.uri) as im:
            assert (r.width, r.height) == im.size


def test_sample_box_values_match_xml_pixels(sample, tmp_path):
    export, _ = sample
    ingest([str(export)], tmp_path / "ingest")
    first = manifest(tmp_path / "ingest")[0]
    xml = (export / "shapes_00000.xml").read_text()
    x0 = int(xml.split("<xmin>")[1].split("<")[0])
    y1 = int(xml.split("<ymax>")[1].split("<")[0])
    assert first.boxes[0].xmin == pytest.approx(x0 / first.width)
    assert first.boxes[0].ymax == pytest.approx(y1 / first.height)


def test_image_resolved_from_filename_not_annotator_path(sample, tmp_path):
    export, _ = sample
    assert "<path>/home/annotator/" in (export / "shapes_00003.xml").read_text()
    ingest([str(export)], tmp_path / "ingest")
    record = manifest(tmp_path / "ingest")[3]
    assert record.source.kind == "local"
    assert record.source.uri == str((export / "shapes_00003.jpg").resolve())
    assert record.source_id == "shapes_00003.jpg"
    assert "/home/annotator" not in record.source.uri


def test_images_resolve_relative_to_xml_in_subfolders(tmp_path):
    export = tmp_path / "export"
    add_pair(export / "a", "cat_img", objects=[("cat", (10, 10, 50, 50))])
    add_pair(export / "b", "dog_img", objects=[("dog", (10, 10, 50, 50))])
    ingest([str(export)], tmp_path / "out")
    records = manifest(tmp_path / "out")
    assert [(Path(r.source.uri).parent.name, r.boxes[0].label) for r in records] == [
        ("a", "cat"), ("b", "dog")]


def test_same_name_in_two_subfolders_of_one_export_are_distinct_images(tmp_path):
    export = tmp_path / "export"
    add_pair(export / "day", "0001", objects=[("cat", (10, 10, 50, 50))])
    add_pair(export / "night", "0001", objects=[("dog", (10, 10, 50, 50))])
    summary = ingest([str(export)], tmp_path / "out")
    assert rejections(tmp_path / "out") == []
    assert summary["images"] == 2
    keys = [r.key for r in manifest(tmp_path / "out")]
    assert len(set(keys)) == 2


BILLION_LAUGHS = """<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
 <!ENTITY lol5 "&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;">
 <!ENTITY lol6 "&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;">
 <!ENTITY lol7 "&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;">
 <!ENTITY lol8 "&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;">
 <!ENTITY lol9 "&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;">
]>
<annotation><filename>good.jpg</filename><size><width>100</width><height>80</height></size>
<object><name>&lol9;</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>50</xmax><ymax>50</ymax>
</bndbox></object></annotation>
"""

XXE = """<?xml version="1.0"?>
<!DOCTYPE annotation [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>
<annotation><filename>good.jpg</filename><size><width>100</width><height>80</height></size>
<object><name>&xxe;</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>50</xmax><ymax>50</ymax>
</bndbox></object></annotation>
"""


@pytest.fixture
def hostile(tmp_path):
    """An export with two good records and one bad file per hostile/bad case."""
    export = tmp_path / "export"
    add_pair(export, "good", objects=[("cat", (10, 10, 60, 60))])
    add_pair(export, "good2", objects=[("dog", (0, 0, 100, 80))])
    (export / "other_root.xml").write_text("<config><filename>good.jpg</filename></config>")
    (export / "malformed.xml").write_text("<annotation><filename>good.jpg</filename>")
    (export / "bomb.xml").write_text(BILLION_LAUGHS)
    (export / "xxe.xml").write_text(XXE)
    (export / "escape.xml").write_text(voc("../../etc/passwd", objects=[("x", (1, 1, 9, 9))]))
    (export / "absolute.xml").write_text(voc("/etc/passwd", objects=[("x", (1, 1, 9, 9))]))
    add_pair(export, "missing", image=False, objects=[("cat", (1, 1, 9, 9))])
    add_pair(export, "outside", objects=[("cat", (10, 10, 50, 50)), ("far", (50, 40, 130, 79))])
    add_pair(export, "degenerate", objects=[("flat", (20, 20, 20, 40)), ("dog", (5, 5, 15, 15))])
    add_pair(export, "allbad", objects=[("flat", (20, 20, 20, 40)), ("far", (0, 0, 300, 10))])
    add_pair(export, "slightly", objects=[("edge", (-1, 5, 101, 81))])
    out = tmp_path / "ingest"
    summary = ingest([str(export)], out)
    by_file: dict[str, list[dict]] = {}
    for r in rejections(out):
        by_file.setdefault(Path(r["file"]).name, []).append(r)
    records = {r.key: r for r in manifest(out)}
    return export, summary, by_file, records


@pytest.mark.parametrize("file,record,reason", [
    ("other_root.xml", "document", "not a Pascal VOC annotation: root element <config>"),
    ("malformed.xml", "document", "not well-formed XML"),
    ("bomb.xml", "document", "forbidden XML construct"),
    ("xxe.xml", "document", "forbidden XML construct"),
    ("escape.xml", "filename", "path outside the allowed root"),
    ("absolute.xml", "filename", "absolute path refused"),
    ("missing.xml", "missing.jpg", "missing image"),
    ("outside.xml", "object[1]", "box outside the image"),
    ("degenerate.xml", "object[0]", "degenerate box"),
])
def test_bad_case_rejected_with_file_and_reason(hostile, file, record, reason):
    export, _, by_file, _ = hostile
    assert file in by_file, f"no rejection for {file}: {sorted(by_file)}"
    [rejection] = by_file[file]
    assert rejection["file"] == str(export / file)
    assert rejection["record"] == record
    assert reason in rejection["reason"]


def test_good_records_survive_hostile_export(hostile):
    _, summary, by_file, records = hostile
    assert sorted(records) == ["degenerate", "good", "good2", "outside", "slightly"]
    assert records["good"].boxes[0].label == "cat"
    assert (records["good2"].boxes[0].xmin, records["good2"].boxes[0].xmax) == (0.0, 1.0)
    assert summary["rejected"] == sum(len(v) for v in by_file.values()) == 12
    assert summary["rejections_by_reason"]["forbidden XML construct"] == 2


def test_hostile_paths_never_read(hostile):
    _, _, _, records = hostile
    for r in records.values():
        assert "passwd" not in r.source.uri and "passwd" not in r.source_id
    assert sorted(b.label for r in records.values() for b in r.boxes) == [
        "cat", "cat", "dog", "dog", "edge"]


def test_entity_payloads_not_expanded(hostile):
    export, _, _, _ = hostile
    out = export.parent / "ingest"
    text = (out / "manifest.jsonl").read_text() + (out / "rejections.jsonl").read_text()
    assert "lollollol" not in text
    assert "root:x:0:0" not in text  # /etc/passwd content


def test_bad_box_drops_box_keeps_image(hostile):
    _, _, by_file, records = hostile
    assert [b.label for b in records["outside"].boxes] == ["cat"]
    assert [b.label for b in records["degenerate"].boxes] == ["dog"]
    assert "slightly.xml" not in by_file


def test_image_whose_boxes_all_fail_is_dropped_not_kept_as_background(hostile):
    _, _, by_file, records = hostile
    assert "allbad" not in records
    reasons = [r["reason"] for r in by_file["allbad.xml"]]
    assert "no usable box: all 2 objects rejected" in reasons
    assert sum(r.startswith(("degenerate box", "box outside")) for r in reasons) == 2


def test_slightly_outside_box_is_clipped(hostile):
    _, _, _, records = hostile
    [box] = records["slightly"].boxes
    assert (box.xmin, box.xmax, box.ymax) == (0.0, 1.0, 1.0)
    assert box.ymin == pytest.approx(5 / 80)


def test_empty_export_folder_raises_naming_it(tmp_path):
    empty = tmp_path / "empty_export"
    empty.mkdir()
    with pytest.raises(StageError) as info:
        ingest([str(empty)], tmp_path / "out")
    assert str(empty) in str(info.value)
    assert not (tmp_path / "out").exists()


def test_missing_export_raises(tmp_path):
    with pytest.raises(StageError, match="nope"):
        ingest([str(tmp_path / "nope")], tmp_path / "out")


def test_all_bad_raises_and_still_writes_rejections(tmp_path):
    export = tmp_path / "export"
    export.mkdir()
    (export / "a.xml").write_text("<notvoc/>")
    add_pair(export, "b", image=False)
    out = tmp_path / "out"
    with pytest.raises(StageError) as info:
        ingest([str(export)], out)
    assert str(export) in str(info.value)
    assert str(out / "rejections.jsonl") in str(info.value)
    rej = rejections(out)
    assert sorted(Path(r["file"]).name for r in rej) == ["a.xml", "b.xml"]
    assert manifest(out) == []


def test_fingerprint_stable_and_sensitive(tmp_path):
    export = tmp_path / "export"
    sample_data.generate(export, count=4, seed=3)
    first = ingest([str(export)], tmp_path / "o1")["fingerprint"]
    second = ingest([str(export)], tmp_path / "o2")["fingerprint"]
    assert first == second
    xml = export / "shapes_00002.xml"
    text = xml.read_text()
    start = text.index("<xmin>") + len("<xmin>")
    end = text.index("</xmin>")
    xml.write_text(text[:start] + str(int(text[start:end]) + 1) + text[end:])
    third = ingest([str(export)], tmp_path / "o3")["fingerprint"]
    assert third != first


def test_later_export_relabels_and_duplicates_within_one_export_are_reported(tmp_path):
    """Across exports the later-landed one wins (a re-labelled image is not a conflict);
    within one export two records of one image still are."""
    a, b = tmp_path / "a", tmp_path / "b"
    sample_data.generate(a, count=3, seed=5)
    shutil.copytree(a, b)
    os.utime(b / "_SUCCESS", (2e9, 2e9))  # b landed after a
    xml = b / "shapes_00001.xml"
    text = xml.read_text()
    start = text.index("<xmin>") + len("<xmin>")
    end = text.index("</xmin>")
    xml.write_text(text[:start] + str(int(text[start:end]) + 1) + text[end:])  # one box moves
    shutil.copy(b / "shapes_00002.xml", b / "copy_of_00002.xml")
    summary = ingest([str(b), str(a)], tmp_path / "out")
    assert (summary["images"], summary["rejected"]) == (3, 1)
    [rejected] = rejections(tmp_path / "out")
    assert rejected["reason"].startswith("duplicate record: image key shapes_00002 already "
                                         f"given by {b / 'copy_of_00002.xml'}")
    by_key = {r.key: r for r in manifest(tmp_path / "out")}
    assert str(b) in by_key["shapes_00001"].source.uri  # the re-labelled image: b's labels
    assert str(a) in by_key["shapes_00000"].source.uri  # unchanged: keeps where it was
    assert by_key["shapes_00000"].provenance["export"] == str(b)  # ... confirmed by b


def test_rejections_by_reason_groups_box_reasons(tmp_path):
    export = tmp_path / "export"
    add_pair(export, "one", objects=[("a", (10, 10, 150, 50)), ("b", (30, 30, 30, 50)),
                                     ("ok", (1, 1, 9, 9))])
    add_pair(export, "two", objects=[("a", (10, 10, 50, 200)), ("b", (30, 30, 60, 20)),
                                     ("ok", (1, 1, 9, 9))])
    summary = ingest([str(export)], tmp_path / "out")
    assert summary["rejections_by_reason"] == {"box outside the image": 2, "degenerate box": 2}


def test_symlinked_image_pointing_outside_is_refused(tmp_path):
    outside = tmp_path / "secret.jpg"
    Image.new("RGB", (100, 80)).save(outside, "JPEG")
    export = tmp_path / "export"
    add_pair(export, "good", objects=[("cat", (10, 10, 60, 60))])
    (export / "link.jpg").symlink_to(outside)
    (export / "link.xml").write_text(voc("link.jpg", objects=[("cat", (1, 1, 9, 9))]))
    ingest([str(export)], tmp_path / "out")
    [rej] = rejections(tmp_path / "out")
    assert rej["file"] == str(export / "link.xml") and "path outside the allowed root" in rej["reason"]
    assert [r.key for r in manifest(tmp_path / "out")] == ["good"]


@pytest.mark.parametrize("width,height", [("0.9", "80"), ("100.5", "80"), ("70000", "80"),
                                          ("100", "nan")])
def test_voc_fractional_or_implausible_size_is_rejected_not_rescaled(tmp_path, width, height):
    """Pixel boxes are divided by the annotation's size: `<width>0.9</width>` or 100.5 would
    rescale every box silently (#18); the file is rejected naming its size instead."""
    export = tmp_path / "export"
    add_pair(export, "good", objects=[("cat", (10, 10, 60, 60))])
    add_pair(export, "odd", objects=[("cat", (0.1, 0.1, 0.5, 0.5))])
    (export / "odd.xml").write_text(voc("odd.jpg", width, height,
                                        [("cat", (0.1, 0.1, 0.5, 0.5))]))
    ingest([str(export)], tmp_path / "out")
    assert [r.key for r in manifest(tmp_path / "out")] == ["good"]
    [rejection] = rejections(tmp_path / "out")
    assert (Path(rejection["file"]).name, rejection["record"]) == ("odd.xml", "size")
    assert rejection["reason"].startswith(f"invalid image size: {float(width):g}x")
    assert "whole pixels from 1 to 65535" in rejection["reason"]


def test_symlinked_annotation_file_pointing_outside_is_refused_unread(tmp_path):
    """A symlink in the export to a file elsewhere (#18): refused as a rejection naming the
    link, its content never read (it used to be parsed, and its first line reported)."""
    secret = tmp_path / "secret.csv"
    secret.write_text("root:x:0:0:root:/root:/bin/bash\n")
    export = tmp_path / "export"
    add_pair(export, "good", objects=[("cat", (10, 10, 60, 60))])
    (export / "labels.csv").symlink_to(secret)
    (export / "more.xml").symlink_to(secret)
    summary = ingest([str(export)], tmp_path / "out")
    assert [r.key for r in manifest(tmp_path / "out")] == ["good"]
    assert sorted((r["file"], r["record"]) for r in rejections(tmp_path / "out")) == [
        (str(export / "labels.csv"), "file"), (str(export / "more.xml"), "file")]
    assert all(r["reason"].startswith("outside the export: a symlink")
               for r in rejections(tmp_path / "out"))
    written = "".join(p.read_text() for p in (tmp_path / "out").iterdir())
    assert "root:x" not in written and summary["ignored_files"] == []


def test_paths_that_flatten_alike_stay_distinct_images(tmp_path):
    """`x/y.jpg` and `x__y.jpg` are two images (#18): both are kept, under distinct keys
    (they were refused as a "conflicting duplicate"); plain paths keep their plain keys."""
    export = tmp_path / "export"
    add_pair(export / "x", "y", objects=[("cat", (10, 10, 60, 60))])
    add_pair(export, "x__y", objects=[("dog", (10, 10, 60, 60))])
    add_pair(export, "a b", objects=[("cat", (1, 1, 9, 9))])
    add_pair(export, "a_b", objects=[("dog", (1, 1, 9, 9))])
    summary = ingest([str(export)], tmp_path / "out")
    assert rejections(tmp_path / "out") == []
    records = {r.key: r for r in manifest(tmp_path / "out")}
    assert summary["images"] == len(records) == 4
    assert len({r.source.uri for r in records.values()}) == 4
    assert records["x__y"].source.uri == str(export / "x" / "y.jpg")  # the plain one keeps it
    assert records["a_b"].source.uri == str(export / "a_b.jpg")
    assert [b.label for b in records["x__y"].boxes] == ["cat"]


@pytest.mark.parametrize("path,key", [("0001.jpg", "0001"), ("day/0001.jpg", "day__0001"),
                                      ("shapes_00001.jpg", "shapes_00001"),
                                      ("v1.2/img-3.b.png", "v1.2__img-3.b")])
def test_ordinary_paths_keep_their_keys(path, key):
    assert key_from_path(path) == key


def _mostly_bad_export(folder: Path) -> Path:
    """1 usable image, 4 broken annotation files, and 3 annotator rejections (choices)."""
    add_pair(folder, "good", objects=[("cat", (10, 10, 60, 60))])
    for index in range(4):
        (folder / f"broken{index}.xml").write_text("<annotation><filename>good.jpg")
    (folder / "db.jsonl").write_text("".join(
        json.dumps({"image": "good.jpg", "answer": "reject"}) + "\n" for _ in range(3)))
    return folder


def test_rejections_above_the_budget_fail_ingest_naming_count_threshold_and_setting(tmp_path):
    """A run must not train on what is left of a mostly broken export (#18): 4 of 5 records
    rejected is above a budget of 20%; the 3 Prodigy rejects are choices, not counted."""
    export = _mostly_bad_export(tmp_path / "export")
    out = tmp_path / "out"
    with pytest.raises(StageError) as info:
        ingest([str(export)], out, max_rejected_share=0.2)
    message = str(info.value)
    assert info.value.failure == Failure.DATA
    assert "4 of 5 records rejected (80.0%), above the budget of 20.0%" in message
    assert "exports.max_rejected_share" in message  # the Python API speaks config keys
    assert "--max-rejected-share" not in message
    assert str(out / "rejections.jsonl") in message and len(rejections(out)) == 7
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["rejected"], summary["rejected_counted"], summary["read"]) == (7, 4, 5)
    assert summary["rejected_share"] == 0.8 and summary["max_rejected_share"] == 0.2
    kept = ingest([str(export)], tmp_path / "out2", max_rejected_share=0.8)
    assert kept["images"] == 1 and kept["rejected_counted"] == 4


def test_cli_fails_above_the_default_budget_and_its_flag_sets_it(tmp_path):
    """`odapi ingest` takes exports.max_rejected_share's default (0.2): a real child process
    exits with the data failure; --max-rejected-share raises the budget."""
    export = _mostly_bad_export(tmp_path / "export")
    command = [sys.executable, "-m", "odapi_operators", "ingest", str(export)]
    failed = subprocess.run([*command, "--out", str(tmp_path / "a")], capture_output=True,
                            text=True, timeout=120)
    assert failed.returncode == EXIT_CODES[Failure.DATA], failed.stderr
    assert "--max-rejected-share" in failed.stderr
    done = subprocess.run([*command, "--out", str(tmp_path / "b"), "--max-rejected-share", "0.9"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["rejected_counted"] == 4


@pytest.mark.parametrize("name", [".", "sub/.."])
def test_image_name_of_the_folder_itself_is_refused(tmp_path, name):
    """Found by fuzzing: "." resolved to the export folder, "inside" it but no image."""
    export = tmp_path / "export"
    add_pair(export, "good", objects=[("cat", (10, 10, 60, 60))])
    (export / "dot.xml").write_text(voc(name, objects=[("cat", (1, 1, 9, 9))]))
    ingest([str(export)], tmp_path / "out")
    [rejection] = rejections(tmp_path / "out")
    assert (rejection["record"], rejection["reason"].split(":")[0]) == ("filename",
                                                                         "not a file name")
