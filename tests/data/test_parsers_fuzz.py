"""Property-based fuzzing of every annotation parser (#18).

Whatever an export holds (arbitrary bytes, or documents of the right shape filled with
hostile values: deep nesting, huge numbers, NaN/inf, wrong types, unicode, traversal paths,
missing keys), a parser:

- never raises: one bad file, line or record is a rejection, the rest go on;
- never points outside the export roots: a local image is inside the export (or the inline
  folder), and the content of a file outside it never shows up in what the parser reports;
- accounts for every input record: it is yielded as an `ImageRecord` or rejected with a reason.

Examples are bounded and derandomized, so the module is fast and CI is reproducible.
"""

from __future__ import annotations

import csv
import io
import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape, quoteattr

import pytest

from odapi_operators.core.data import formats
from odapi_operators.core.data.formats import ParseContext
from odapi_operators.core.data.manifest import ImageRecord
from odapi_operators.core.rejections import RejectionLog

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

FUZZ = settings(max_examples=80, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))
SECRET = "SECRET-CONTENT-7f3a"  # in a file outside the export; must never be reported
SUFFIX = {"cvat": ".xml", "voc": ".xml", "coco": ".json", "labelstudio": ".json",
          "prodigy": ".jsonl", "openimages": ".csv", "csv": ".csv", "yolo": ".txt",
          "tfrecord": ".tfrecord"}
DEEP = {"__DEEP_PARSES__": 400, "__DEEP_TOO_DEEP__": 5000}  # placeholders -> nested lists

# ---------------------------------------------------------------- hostile values

HOSTILE_PATHS = ["a.jpg", "sub/b.jpg", "link.jpg", "../outside/secret.jpg", "/etc/passwd",
                 "__SECRET_ABS__", "sub/../../outside/secret.jpg", "..", ".", "", " ",
                 "a.jpg\x00.png", "ü/ñ 1.jpg", "C:\\Users\\me\\a.jpg", "\\\\server\\share\\a.jpg",
                 "%2e%2e/outside/secret.jpg", "/data/local-files/?d=../outside/secret.jpg",
                 "/data/local-files/?d=a.jpg", "/data/upload/1/0123abcd-a.jpg",
                 "https://example.com/a.jpg?x=1", "gs://bucket/a.jpg", "s3://bucket/a.jpg",
                 "data:image/png;base64,iVBORw0KGgo=", "data:text/plain;base64,QUJD",
                 "file:///etc/passwd"]
HOSTILE_NUMBERS = [0, -1, 1, 100, 0.9, 100.5, 1e308, -1e308, 10 ** 400, float("nan"),
                   float("inf"), float("-inf"), True, 2 ** 63, 65_536]

paths = st.sampled_from(HOSTILE_PATHS) | st.text(max_size=12)
numbers = st.sampled_from(HOSTILE_NUMBERS) | st.integers(-10, 300) | st.floats()
scalars = (st.none() | st.booleans() | numbers | st.text(max_size=12) | paths
           | st.sampled_from(list(DEEP)))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=8)


def field(good: st.SearchStrategy) -> st.SearchStrategy:
    """Mostly the right kind of value, sometimes any hostile one."""
    return st.one_of(good, good, values)


def maybe(fields: dict[str, st.SearchStrategy]) -> st.SearchStrategy:
    """A JSON object with each key present or missing."""
    return st.fixed_dictionaries({}, optional=fields)


labels = st.sampled_from(["cat", "dog", "", " cat ", "ünï", "a" * 300]) | st.text(max_size=8)
box4 = st.lists(numbers, min_size=4, max_size=4)

# ---------------------------------------------------------------- documents per format

coco_docs = st.fixed_dictionaries({
    "images": st.lists(maybe({"id": field(st.integers(1, 4)), "file_name": field(paths),
                              "width": field(numbers), "height": field(numbers)}), max_size=4),
}, optional={
    "annotations": field(st.lists(maybe({
        "id": values, "image_id": field(st.integers(1, 4)), "category_id": field(st.integers(1, 3)),
        "bbox": field(box4), "iscrowd": field(st.sampled_from([0, 1]))}), max_size=5)),
    "categories": field(st.lists(maybe({"id": field(st.integers(1, 3)), "name": field(labels)}),
                                 max_size=3)),
})

ls_results = st.lists(maybe({
    "type": field(st.sampled_from(["rectanglelabels", "choices", "polygonlabels"])),
    "original_width": field(numbers), "original_height": field(numbers),
    "value": field(maybe({"x": field(numbers), "y": field(numbers), "width": field(numbers),
                          "height": field(numbers), "rotation": field(numbers),
                          "rectanglelabels": field(st.lists(labels, max_size=2))}))}),
    max_size=3)
ls_tasks = st.lists(field(maybe({
    "id": values, "data": field(maybe({"image": field(paths)})),
    "annotations": field(st.lists(field(maybe({
        "id": values, "was_cancelled": values, "ground_truth": values, "updated_at": values,
        "result": field(ls_results), "parent_prediction": values})), max_size=2)),
    "predictions": field(st.lists(maybe({"id": values, "model_version": values}), max_size=2)),
})), max_size=4)

prodigy_lines = st.lists(field(maybe({
    "image": field(paths), "path": field(paths), "width": field(numbers), "height": field(numbers),
    "answer": field(st.sampled_from(["accept", "reject", "ignore"])), "_task_hash": values,
    "meta": field(maybe({"model_version": values})),
    "spans": field(st.lists(field(maybe({
        "label": field(labels), "x": field(numbers), "y": field(numbers),
        "width": field(numbers), "height": field(numbers),
        "points": field(st.lists(st.lists(numbers, min_size=2, max_size=2), max_size=4))})),
        max_size=3))})), min_size=1, max_size=4)

xml_text = st.sampled_from(["0.9", "100", "-5", "nan", "1e999", "abc", "", "70000"]) \
    | st.text(max_size=8)
voc_docs = st.fixed_dictionaries({
    "filename": st.sampled_from(HOSTILE_PATHS), "width": xml_text, "height": xml_text,
    "objects": st.lists(st.tuples(st.text(max_size=6), st.lists(xml_text, min_size=4,
                                                                max_size=4)), max_size=3)})
cvat_docs = st.lists(st.fixed_dictionaries({
    "name": st.sampled_from(HOSTILE_PATHS), "width": xml_text, "height": xml_text,
    "shapes": st.lists(st.tuples(st.sampled_from(["box", "polygon", "tag"]), st.text(max_size=6),
                                 st.lists(xml_text, min_size=5, max_size=5)), max_size=3)}),
    max_size=3)
csv_cells = st.sampled_from(HOSTILE_PATHS) | xml_text | st.text(max_size=8)
csv_rows = st.lists(st.lists(csv_cells, min_size=6, max_size=9), min_size=1, max_size=5)


def dumps_json(value: Any) -> str:
    text = json.dumps(value, allow_nan=True)
    for marker, depth in DEEP.items():
        text = text.replace(json.dumps(marker), "[" * depth + "]" * depth)
    return text


def voc_xml(doc: dict) -> str:
    objects = "".join(
        f"<object><name>{escape(name)}</name><bndbox>"
        + "".join(f"<{c}>{escape(v)}</{c}>" for c, v in zip(("xmin", "ymin", "xmax", "ymax"), box))
        + "</bndbox></object>" for name, box in doc["objects"])
    return (f"<annotation><filename>{escape(doc['filename'])}</filename><size><width>"
            f"{escape(doc['width'])}</width><height>{escape(doc['height'])}</height></size>"
            f"{objects}</annotation>")


def cvat_xml(images: list[dict]) -> str:
    body = ""
    for index, image in enumerate(images):
        shapes = "".join(
            f"<{tag} label={quoteattr(label)}"
            + "".join(f" {a}={quoteattr(v)}" for a, v in zip(("xtl", "ytl", "xbr", "ybr",
                                                               "rotation"), coords)) + "/>"
            for tag, label, coords in image["shapes"])
        body += (f"<image id=\"{index}\" name={quoteattr(image['name'])} "
                 f"width={quoteattr(image['width'])} height={quoteattr(image['height'])}>"
                 f"{shapes}</image>")
    return f"<annotations><version>1.1</version>{body}</annotations>"


def csv_text(header: list[str], rows: list[list[str]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(header)
    writer.writerows(rows)
    return out.getvalue()


# ---------------------------------------------------------------- running one parser

def run_parser(fmt: str, content: str | bytes, name: str | None = None,
               beside: dict[str, str] | None = None
               ) -> tuple[list[ImageRecord], RejectionLog, Path, Path]:
    """Parse `content` as the only file of a fresh export (with `beside`: {name: text} of
    companion files it finds on its own); check the properties every parser must keep;
    return (records, log, annotation file, export root)."""
    with tempfile.TemporaryDirectory(prefix="odapi-fuzz-") as tmp:
        base = Path(tmp)
        export, outside = base / "export", base / "outside"
        (export / "sub").mkdir(parents=True)
        outside.mkdir()
        (outside / "secret.jpg").write_text(SECRET)
        (export / "link.jpg").symlink_to(outside / "secret.jpg")
        for image in ("a.jpg", "sub/b.jpg", "0123abcd-a.jpg"):
            (export / image).write_bytes(b"\xff\xd8\xff" + b"\0" * 16)
        for companion, text in (beside or {}).items():
            (export / companion).write_text(text)
        file = export / (name or f"export{SUFFIX[fmt]}")
        if isinstance(content, str):
            content = content.replace("__SECRET_ABS__", str(outside / "secret.jpg"))
            content = content.encode("utf-8", "surrogatepass")
        file.write_bytes(content)
        log = RejectionLog()
        ctx = ParseContext(export_root=export, images_root=None, log=log,
                           inline_dir=base / "inline")
        records = list(formats.load(fmt).parse([file], ctx))  # must not raise
        for record in records:
            if record.source.kind == "local":
                path = Path(record.source.uri)
                assert export.resolve() in path.parents or path.parent == base / "inline", \
                    record.source
            assert record.key and "/" not in record.key
            json.dumps(record.to_dict(), allow_nan=True)  # the manifest can be written
        for rejection in log.items:
            assert rejection.reason.strip() and rejection.record.strip(), rejection
            assert SECRET not in rejection.reason
            json.dumps(rejection.__dict__)
        return records, log, file, export


def accounted(units: int, records: list[ImageRecord], log: RejectionLog,
              unit_of_record: Callable[[ImageRecord], int | None],
              unit_of_rejection: Callable[[str], int | None]) -> None:
    """Every input unit (task, line, image entry) is yielded or rejected with a reason; a
    rejection of the whole "document" accounts for all of them."""
    if any(r.record == "document" for r in log.items):
        return
    seen = {unit_of_record(r) for r in records} | {unit_of_rejection(r.record) for r in log.items}
    missing = [unit for unit in range(units) if unit not in seen]
    assert not missing, (missing, [r.provenance for r in records], log.items)


def index_in(record: str, prefix: str) -> int | None:
    """n from a record string `<prefix>[n]...`."""
    if record.startswith(prefix + "["):
        return int(record[len(prefix) + 1:].split("]", 1)[0])
    return None


# ---------------------------------------------------------------- properties

@FUZZ
@given(fmt=st.sampled_from(formats.AVAILABLE), data=st.binary(max_size=600))
def test_arbitrary_bytes_never_escape_a_parser(fmt, data):
    run_parser(fmt, data)


@FUZZ
@given(doc=coco_docs)
def test_coco_hostile_documents(doc):
    records, log, _, _ = run_parser("coco", dumps_json(doc))
    accounted(len(doc["images"]), records, log,
              lambda r: index_in(r.provenance["element"], "images"),
              lambda record: index_in(record, "images"))


@FUZZ
@given(tasks=ls_tasks)
def test_labelstudio_hostile_documents(tasks):
    records, log, _, _ = run_parser("labelstudio", dumps_json(tasks))
    names = {}
    for index, task in enumerate(tasks):
        ident = task.get("id") if isinstance(task, dict) else None
        names[f"tasks[{index}]"] = index
        if isinstance(ident, (str, int)) and not isinstance(ident, bool):
            names[f"task {ident}"] = index
    # with ids shared between tasks, a rejection naming one id speaks for all of them
    accounted(len(tasks), records, log,
              lambda r: index_in(r.provenance["element"], "tasks"),
              lambda record: names.get(record) if record in names else next(
                  (i for n, i in names.items() if record.startswith(n + " ")), None))


@FUZZ
@given(lines=prodigy_lines, blank=st.booleans())
def test_prodigy_hostile_lines(lines, blank):
    text = "\n".join(dumps_json(line) for line in lines) + ("\n\n" if blank else "")
    records, log, _, _ = run_parser("prodigy", text)
    accounted(len(lines), records, log, lambda r: r.provenance["line"] - 1,
              lambda record: int(record.split()[1]) - 1 if record.startswith("line ") else None)


@FUZZ
@given(doc=voc_docs)
def test_voc_hostile_documents(doc):
    records, log, file, _ = run_parser("voc", voc_xml(doc))
    assert len(records) + sum(r.file == str(file) and r.record != "document"
                              and not r.record.startswith("object[") for r in log.items) \
        + any(r.record == "document" for r in log.items) >= 1


@FUZZ
@given(images=cvat_docs)
def test_cvat_hostile_documents(images):
    records, log, _, _ = run_parser("cvat", cvat_xml(images))
    if not any(r.record == "document" for r in log.items):
        named = {r.provenance["element"] for r in records} | {
            r.record.split("]", 1)[0] + "]" for r in log.items}
        for index in range(len(images)):
            assert any(n.startswith(f"image[id={index}") for n in named), (index, named)


@FUZZ
@given(rows=csv_rows, layout=st.sampled_from([
    ["filename", "width", "height", "class", "xmin", "ymin", "xmax", "ymax"],
    ["path", "xmin", "ymin", "xmax", "ymax", "label"]]))
def test_csv_hostile_rows(rows, layout):
    records, log, _, _ = run_parser("csv", csv_text(layout, rows))
    assert records or log.items


@FUZZ
@given(rows=csv_rows)
def test_openimages_hostile_rows(rows):
    header = ["ImageID", "Source", "LabelName", "Confidence", "XMin", "XMax", "YMin", "YMax"]
    records, log, _, _ = run_parser("openimages", csv_text(header, rows))
    for record in records:
        assert record.source.kind in ("local", "url", "gs")


yolo_tokens = st.sampled_from(["0", "1", "2", "3", "-1", "0.0", "1.5", "x", "0.5", "0.1",
                               "nan", "inf", "-0.2", "1e9", "1e-9", ".5", "", "\x00"]) \
    | st.text(max_size=5)
yolo_lines = st.lists(st.lists(yolo_tokens, max_size=10).map(" ".join), min_size=1, max_size=6)


@FUZZ
@given(lines=yolo_lines, crlf=st.booleans())
def test_yolo_hostile_lines(lines, crlf):
    text = ("\r\n" if crlf else "\n").join(lines)
    records, log, file, _ = run_parser("yolo", text, name="a.txt",
                                       beside={"classes.txt": "cat\ndog\n"})
    if any(r.record == "file" and not r.reason.startswith("no usable box") for r in log.items):
        return  # the file as a whole was refused (e.g. not UTF-8)
    numbered = [n for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    rejected = {int(r.record.split()[1]) for r in log.items if r.record.startswith("line ")}
    assert sum(len(r.boxes) for r in records) + len(rejected) == len(numbered)
    assert rejected <= set(numbered)


OD_API_KEYS = ["image/encoded", "image/height", "image/width", "image/filename",
               "image/source_id", "image/object/bbox/xmin", "image/object/bbox/xmax",
               "image/object/bbox/ymin", "image/object/bbox/ymax", "image/object/class/text",
               "image/object/class/label", "image/object/is_crowd"]
JPEG_HEAD = b"\xff\xd8\xff" + b"\0" * 16
feature_values = st.one_of(
    st.lists(st.sampled_from([JPEG_HEAD, b"cat", b"\xff", b"", b"../a.jpg"]) | st.binary(
        max_size=8), max_size=3).map(lambda v: ("bytes", v)),
    st.lists(st.floats(width=32) | st.sampled_from([0.1, 0.5, 0.9]), max_size=3).map(
        lambda v: ("float", v)),
    st.lists(st.integers(-2**63, 2**63 - 1) | st.integers(0, 3), max_size=3).map(
        lambda v: ("int64", v)))
tf_examples = st.lists(st.one_of(
    st.dictionaries(st.sampled_from(OD_API_KEYS), feature_values, max_size=12),
    st.binary(max_size=40)), min_size=1, max_size=4)


@FUZZ
@given(examples=tf_examples, tail=st.binary(max_size=20))
def test_tfrecord_hostile_examples(examples, tail):
    from odapi_operators.core.data import tfrecord as wire

    encode = {"bytes": wire.bytes_feature, "float": wire.float_feature,
              "int64": wire.int64_feature}
    out = io.BytesIO()
    for example in examples:
        data = example if isinstance(example, bytes) else wire.encode_example(
            {key: encode[kind](values) for key, (kind, values) in example.items()})
        wire.write_record(out, data)
    records, log, _, _ = run_parser("tfrecord", out.getvalue() + tail)
    seen = {r.provenance["record"] for r in records} | {
        int(r.record.split()[1]) for r in log.items if r.record.startswith("record ")}
    assert set(range(1, len(examples) + 1)) <= seen
