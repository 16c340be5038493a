"""label map, split, and the TF-free TFRecord encoder checked against TensorFlow's own readers."""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from odapi_operators.core.data import sample_data
from odapi_operators.core.data.ingest import ingest
from odapi_operators.core.data.label_map import (
    LabelMapError,
    build_label_map,
    extend_label_map,
    format_label_map,
    parse_label_map,
    read_label_map,
)
from odapi_operators.core.data.manifest import read_manifest
from odapi_operators.core.data.shard import shard_name, write_shards
from odapi_operators.core.data.split import split_of
from odapi_operators.core.data.tfrecord import (
    bytes_feature,
    encode_example,
    float_feature,
    int64_feature,
    write_record,
)
from odapi_operators.core.data.verify import verify_images

# --- label map ---------------------------------------------------------------------------


def test_label_map_round_trip():
    label_map = {"zebra": 1, "apple": 2, "mango": 7}
    text = format_label_map(label_map)
    assert text.index("zebra") < text.index("apple") < text.index("mango")  # id order
    assert 'display_name: "mango"' in text
    assert parse_label_map(text) == label_map


def test_label_map_round_trip_with_quote_in_name():
    label_map = {"driver's licence": 1, "cat": 2}
    assert parse_label_map(format_label_map(label_map)) == label_map


def test_parse_od_api_style_label_map():
    text = """
    item {
      name: "person"   # comment-free but double quoted
      id: 1
      display_name: "Person"
    }
    item { id: 2 name: 'car' }
    """
    assert parse_label_map(text) == {"person": 1, "car": 2}


def test_extend_keeps_ids_and_appends_sorted():
    existing = {"square": 1, "circle": 4}
    extended = extend_label_map(existing, ["triangle", "circle", "arrow", "star", "arrow"])
    assert extended == {"square": 1, "circle": 4, "arrow": 5, "star": 6, "triangle": 7}
    assert existing == {"square": 1, "circle": 4}  # not mutated
    assert extend_label_map({}, ["b", "a"]) == {"a": 1, "b": 2}
    assert extend_label_map(existing, ["square"]) == existing


@pytest.mark.parametrize("text,match", [
    ("item { id: 1 name: 'a' } item { id: 1 name: 'b' }", "duplicate"),
    ("item { id: 1 name: 'a' } item { id: 2 name: 'a' }", "duplicate"),
    ("item { id: 0 name: 'background' }", "ids start at 1"),
    ("item { id: -3 name: 'neg' }", "ids start at 1"),
    ("item { name: 'no_id' }", "without id or name"),
], ids=["dup-id", "dup-name", "id-0", "id-negative", "no-id"])
def test_parse_errors(text, match):
    with pytest.raises(LabelMapError, match=match) as info:
        parse_label_map(text, source="lm.pbtxt")
    assert str(info.value).startswith("lm.pbtxt:")


def test_build_label_map_extends_previous(tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps({
        "key": k, "source": {"kind": "local", "uri": "/x"}, "source_id": k, "width": 1,
        "height": 1, "boxes": [{"label": lbl, "xmin": 0, "ymin": 0, "xmax": 1, "ymax": 1}]})
        + "\n" for k, lbl in (("a", "dog"), ("b", "cat"), ("c", "ant"))))
    previous = tmp_path / "prev.pbtxt"
    previous.write_text(format_label_map({"dog": 1, "eel": 2}))
    summary = build_label_map(manifest, tmp_path / "out", previous=previous)
    assert read_label_map(tmp_path / "out" / "label_map.pbtxt") == {
        "dog": 1, "eel": 2, "ant": 3, "cat": 4}
    assert summary["new_classes"] == ["ant", "cat"]


# --- split -------------------------------------------------------------------------------


def test_split_is_stable_and_independent_of_other_keys():
    ratios = {"train": 0.8, "val": 0.2}
    first = [split_of(f"img_{i}", ratios) for i in range(50)]
    assert first == [split_of(f"img_{i}", dict(ratios)) for i in range(50)]
    assert split_of("img_7", ratios) == first[7]


@pytest.mark.parametrize("ratios", [
    {"train": 0.8, "val": 0.2},
    {"train": 0.7, "val": 0.2, "test": 0.1},
    {"train": 8, "val": 2},  # un-normalized weights
])
def test_split_follows_ratios(ratios):
    counts = Counter(split_of(f"shapes_{i:05d}", ratios) for i in range(2000))
    total = sum(ratios.values())
    for name, ratio in ratios.items():
        assert abs(counts[name] / 2000 - ratio / total) <= 0.03, counts


def test_split_rejects_non_positive_total():
    with pytest.raises(ValueError):
        split_of("x", {"train": 0, "val": 0})


# --- TFRecords, read back by TensorFlow --------------------------------------------------

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@pytest.fixture(scope="module")
def tf():
    import tensorflow

    return tensorflow


RATIOS = {"train": 0.5, "val": 0.5}
SHARDS = {"train": 2, "val": 1}


@pytest.fixture(scope="module")
def records_dir(tmp_path_factory):
    """sample export (+ a box-less image, + a PNG) -> ingest -> verify -> label map -> shards."""
    root = tmp_path_factory.mktemp("records")
    export = root / "export"
    sample_data.generate(export, count=10, seed=4)
    Image.new("RGB", (50, 40), (9, 9, 9)).save(export / "empty.jpg", "JPEG")
    (export / "empty.xml").write_text(sample_data.voc_xml("empty.jpg", "/x/empty.jpg", 50, 40, []))
    Image.new("RGB", (60, 30), (90, 9, 9)).save(export / "zz_png.png", "PNG")
    (export / "zz_png.xml").write_text(sample_data.voc_xml(
        "zz_png.png", "/x/zz_png.png", 60, 30, [sample_data.Shape("square", (6, 3, 30, 27))]))
    ingest([str(export)], root / "ingest")
    verify_images(root / "ingest" / "manifest.jsonl", root / "verify")
    manifest = root / "verify" / "manifest.jsonl"
    build_label_map(manifest, root / "label_map")
    summary = write_shards(manifest, root / "label_map" / "label_map.pbtxt", root / "records",
                           RATIOS, SHARDS)
    label_map = read_label_map(root / "label_map" / "label_map.pbtxt")
    records = {r.key: r for r in read_manifest(manifest)}
    return root / "records", summary, records, label_map


def _read_all(tf, folder: Path) -> list[tuple[str, bytes]]:
    out = []
    for path in sorted(folder.glob("*.tfrecord")):
        for raw in tf.data.TFRecordDataset(str(path)):
            out.append((path.name, raw.numpy()))
    return out


def test_shard_files_and_names(records_dir):
    folder, summary, records, _ = records_dir
    names = sorted(p.name for p in folder.glob("*.tfrecord"))
    assert names == sorted([shard_name("train", 0, 2), shard_name("train", 1, 2),
                            shard_name("val", 0, 1)])
    assert names[0] == "train-00000-of-00002.tfrecord"
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".tmp-")]
    assert len(records) == 12 and records["empty"].boxes == ()


def test_examples_parse_with_identical_features(tf, records_dir):
    folder, _, records, label_map = records_dir
    source_ids = json.loads((folder / "source_ids.json").read_text())
    rows = _read_all(tf, folder)
    assert len(rows) == len(records)
    seen = []
    for shard, raw in rows:
        ex = tf.train.Example.FromString(raw)
        f = ex.features.feature
        sid = f["image/source_id"].bytes_list.value[0].decode()
        assert sid.isdigit()
        seen.append(int(sid))
        key = source_ids[sid]["key"]
        rec = records[key]
        assert shard.startswith(split_of(key, RATIOS) + "-")
        assert source_ids[sid]["split"] == split_of(key, RATIOS)
        encoded = f["image/encoded"].bytes_list.value[0]
        assert encoded == Path(rec.source.uri).read_bytes()
        assert f["image/key/sha256"].bytes_list.value[0].decode() == \
            hashlib.sha256(encoded).hexdigest()
        assert f["image/format"].bytes_list.value[0] == (b"png" if key == "zz_png" else b"jpeg")
        assert f["image/filename"].bytes_list.value[0].decode() == rec.source_id
        assert list(f["image/width"].int64_list.value) == [rec.width]
        assert list(f["image/height"].int64_list.value) == [rec.height]
        for coord in ("xmin", "ymin", "xmax", "ymax"):
            got = list(f[f"image/object/bbox/{coord}"].float_list.value)
            assert got == pytest.approx([getattr(b, coord) for b in rec.boxes], abs=1e-6)
        assert [t.decode() for t in f["image/object/class/text"].bytes_list.value] == \
            [b.label for b in rec.boxes]
        assert list(f["image/object/class/label"].int64_list.value) == \
            [label_map[b.label] for b in rec.boxes]
        assert list(f["image/object/is_crowd"].int64_list.value) == [0] * len(rec.boxes)
        assert list(f["image/object/area"].float_list.value) == pytest.approx(
            [(b.xmax - b.xmin) * rec.width * (b.ymax - b.ymin) * rec.height for b in rec.boxes],
            rel=1e-5)
    assert sorted(seen) == list(range(1, len(records) + 1))
    # ids follow image-key order
    assert [source_ids[str(i)]["key"] for i in range(1, len(records) + 1)] == sorted(records)


def test_tf_vision_decoder_reads_examples(tf, records_dir):
    import numpy as np
    from official.vision.dataloaders.tf_example_decoder import TfExampleDecoder

    folder, _, records, label_map = records_dir
    source_ids = json.loads((folder / "source_ids.json").read_text())
    decoder = TfExampleDecoder()
    checked_empty = False
    for _, raw in _read_all(tf, folder):
        d = decoder.decode(tf.constant(raw))
        sid = d["source_id"].numpy().decode()
        rec = records[source_ids[sid]["key"]]
        boxes = d["groundtruth_boxes"].numpy()
        assert boxes.shape == (len(rec.boxes), 4)
        expected = [[b.ymin, b.xmin, b.ymax, b.xmax] for b in rec.boxes]
        np.testing.assert_allclose(boxes, np.array(expected, dtype=np.float32).reshape(-1, 4),
                                   atol=1e-6)
        assert d["groundtruth_classes"].numpy().tolist() == [label_map[b.label] for b in rec.boxes]
        assert not d["groundtruth_is_crowd"].numpy().any()
        assert (int(d["height"]), int(d["width"])) == (rec.height, rec.width)
        assert tuple(d["image"].shape) == (rec.height, rec.width, 3)
        assert int(tf.strings.to_number(d["source_id"], tf.int64)) == int(sid)
        checked_empty |= not rec.boxes
    assert checked_empty


def test_empty_box_lists_round_trip(tf, records_dir):
    folder, _, records, _ = records_dir
    source_ids = json.loads((folder / "source_ids.json").read_text())
    [sid] = [s for s, v in source_ids.items() if v["key"] == "empty"]
    for _, raw in _read_all(tf, folder):
        f = tf.train.Example.FromString(raw).features.feature
        if f["image/source_id"].bytes_list.value[0].decode() != sid:
            continue
        for name in ("bbox/xmin", "bbox/xmax", "bbox/ymin", "bbox/ymax", "area"):
            assert list(f[f"image/object/{name}"].float_list.value) == []
        assert list(f["image/object/class/label"].int64_list.value) == []
        assert list(f["image/object/class/text"].bytes_list.value) == []
        assert (f["image/width"].int64_list.value[0], f["image/height"].int64_list.value[0]) \
            == (50, 40)
        return
    pytest.fail("empty-box example not found")


def test_split_stats_add_up(tf, records_dir):
    folder, summary, records, label_map = records_dir
    splits = summary["splits"]
    assert set(splits) == {"train", "val"}
    assert all(s["images"] > 0 for s in splits.values())
    assert sum(s["images"] for s in splits.values()) == len(records)
    assert sum(s["boxes"] for s in splits.values()) == sum(len(r.boxes) for r in records.values())
    per_class = Counter()
    for s in splits.values():
        per_class.update(s["per_class"])
    assert per_class == Counter(b.label for r in records.values() for b in r.boxes)
    for name, s in splits.items():
        files = sorted(folder.glob(f"{name}-*.tfrecord"))
        assert s["bytes"] == sum(p.stat().st_size for p in files)
        assert s["images"] == sum(1 for p in files for _ in tf.data.TFRecordDataset(str(p)))
        assert s["images"] == sum(1 for k in records if split_of(k, RATIOS) == name)
        assert s["pattern"] == str(folder / f"{name}-*.tfrecord")
    assert summary["num_classes"] == max(label_map.values())
    on_disk = json.loads((folder / "summary.json").read_text())
    assert on_disk["splits"]["train"]["images"] == splits["train"]["images"]


def test_shards_round_robin(tf, records_dir):
    folder, summary, _, _ = records_dir
    counts = [sum(1 for _ in tf.data.TFRecordDataset(str(folder / shard_name("train", i, 2))))
              for i in range(2)]
    assert sum(counts) == summary["splits"]["train"]["images"]
    assert abs(counts[0] - counts[1]) <= 1


def test_encoder_edge_values(tf, tmp_path):
    features = {
        "ints": int64_feature([0, 1, -1, 127, 128, 2**40, -(2**63), 2**63 - 1]),
        "floats": float_feature([0.0, -1.5, 3.25, 1e-30]),
        "bytes": bytes_feature([b"", b"\x00\xff", "é".encode(), b"x" * 300]),
        "empty_ints": int64_feature([]),
        "empty_bytes": bytes_feature([]),
    }
    path = tmp_path / "edge.tfrecord"
    with open(path, "wb") as fh:
        sizes = [write_record(fh, encode_example(features)), write_record(fh, b"")]
    assert path.stat().st_size == sum(sizes)
    raws = [r.numpy() for r in tf.data.TFRecordDataset(str(path))]
    assert raws[1] == b""
    f = tf.train.Example.FromString(raws[0]).features.feature
    assert list(f["ints"].int64_list.value) == [0, 1, -1, 127, 128, 2**40, -(2**63), 2**63 - 1]
    assert list(f["floats"].float_list.value) == pytest.approx([0.0, -1.5, 3.25, 1e-30])
    assert list(f["bytes"].bytes_list.value) == [b"", b"\x00\xff", "é".encode(), b"x" * 300]
    assert f["empty_ints"].WhichOneof("kind") == "int64_list"
    assert list(f["empty_ints"].int64_list.value) == []
    assert list(f["empty_bytes"].bytes_list.value) == []


def test_corrupt_record_is_detected_by_tf(tf, tmp_path):
    path = tmp_path / "bad.tfrecord"
    with open(path, "wb") as fh:
        write_record(fh, encode_example({"a": bytes_feature([b"hello world"])}))
    data = bytearray(path.read_bytes())
    data[14] ^= 0xFF  # flip a payload byte: the data crc must catch it
    path.write_bytes(bytes(data))
    with pytest.raises(tf.errors.DataLossError):
        list(tf.data.TFRecordDataset(str(path)))
