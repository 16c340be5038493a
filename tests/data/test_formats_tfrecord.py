"""TF Object Detection API TFRecords (+ label_map.pbtxt) ingested as an export.

The TFRecords are written three ways, so the reader is not only checked against its own
writer: by the repo's shard writer (`shard.example_for`, the OD API keys), by protobuf itself
from a descriptor of TensorFlow's `feature.proto` / `example.proto` (packed, and unpacked as
older writers emit), and, in the slow suite, by TensorFlow's own `tf.io.TFRecordWriter`.
The images come from the synthetic VOC sample, whose boxes are the ground truth.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import re
import struct
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from odapi_operators.core.data import sample_data
from odapi_operators.core.data.fetch import fetch_images
from odapi_operators.core.data.formats import ParseContext, detect
from odapi_operators.core.data.formats import tfrecord as tfrecord_format
from odapi_operators.core.data.ingest import ingest
from odapi_operators.core.data.label_map import format_label_map
from odapi_operators.core.data.manifest import read_manifest
from odapi_operators.core.data.shard import example_for
from odapi_operators.core.data.tfrecord import (
    bytes_feature,
    encode_example,
    float_feature,
    int64_feature,
    write_record,
)
from odapi_operators.core.data.verify import verify_images
from odapi_operators.core.rejections import RejectionLog

from conftest import odapi

LABEL_MAP = {name: index for index, name in enumerate(sample_data.CLASSES, 1)}


def f32(value: float) -> float:
    """What a float survives as in a TFRecord (float32)."""
    return struct.unpack("<f", struct.pack("<f", value))[0]


def manifest(out: Path):
    return list(read_manifest(out / "manifest.jsonl"))


def rejections(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "rejections.jsonl").read_text().splitlines()]


def stored_boxes(record) -> list[tuple]:
    return sorted((b.label, f32(b.xmin), f32(b.ymin), f32(b.xmax), f32(b.ymax))
                  for b in record.boxes)


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    """VOC-ingested records of the synthetic sample: images, sizes and boxes to compare to."""
    export = tmp_path_factory.mktemp("voc")
    sample_data.generate(export, count=8, seed=5)
    out = tmp_path_factory.mktemp("voc-ingest") / "out"
    assert ingest([str(export)], out)["rejected"] == 0
    return manifest(out)


def write_records(path: Path, examples: list[bytes]) -> Path:
    with open(path, "wb") as fh:
        for example in examples:
            write_record(fh, example)
    return path


def assert_same_images(records, truth) -> None:
    """Every record is one of the truth's images: same bytes, size, boxes as stored."""
    by_digest = {hashlib.sha256(Path(t.source.uri).read_bytes()).hexdigest(): t for t in truth}
    assert len(records) == len(truth)
    for record in records:
        digest = hashlib.sha256(Path(record.source.uri).read_bytes()).hexdigest()
        expected = by_digest[digest]
        assert record.key == f"tfrecord-{digest[:16]}"
        assert (record.width, record.height) == (expected.width, expected.height)
        assert stored_boxes(record) == sorted(stored_boxes(expected)) == sorted(
            (b.label, b.xmin, b.ymin, b.xmax, b.ymax) for b in record.boxes)


def test_od_api_shards_ingest_exactly_and_verify(tmp_path, sample):
    """Sharded `train.record-0000N-of-00002` + label_map.pbtxt, as the OD API's dataset
    tools write them: boxes and classes exact, images included and verified downstream."""
    export = tmp_path / "od-api"
    export.mkdir()
    examples = [example_for(r, i, LABEL_MAP) for i, r in enumerate(sample, 1)]
    write_records(export / "train.record-00000-of-00002", examples[:5])
    write_records(export / "train.record-00001-of-00002", examples[5:])
    (export / "label_map.pbtxt").write_text(format_label_map(LABEL_MAP))
    summary = ingest([str(export)], tmp_path / "ingest")
    records = manifest(tmp_path / "ingest")
    assert summary["rejected"] == 0 and summary["ignored_files"] == []
    assert_same_images(records, sample)
    assert {r.source_id for r in records} == {r.source_id for r in sample}  # image/filename
    assert all(Path(r.source.uri).parent == tmp_path / "ingest-inline" for r in records)
    fetched = fetch_images(tmp_path / "ingest" / "manifest.jsonl", tmp_path / "images")
    verified = verify_images(tmp_path / "images" / "manifest.jsonl", tmp_path / "verify",
                             workers=1)
    assert fetched["failed"] == 0 and verified["failed"] == 0
    assert len(list(read_manifest(tmp_path / "verify" / "manifest.jsonl"))) == len(sample)


def _example_classes(packed: bool):
    """tf.train.Example as TensorFlow's protos declare it, built with protobuf itself
    (a fresh pool, so it never meets TensorFlow's own descriptors)."""
    file = descriptor_pb2.FileDescriptorProto(name="example.proto", package="tensorflow",
                                              syntax="proto3" if packed else "proto2")
    repeated = descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED
    optional = descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL
    kinds = descriptor_pb2.FieldDescriptorProto
    for name, kind in (("BytesList", kinds.TYPE_BYTES), ("FloatList", kinds.TYPE_FLOAT),
                       ("Int64List", kinds.TYPE_INT64)):
        message = file.message_type.add(name=name)
        message.field.add(name="value", number=1, label=repeated, type=kind)
    feature = file.message_type.add(name="Feature")
    feature.oneof_decl.add(name="kind")
    for number, (name, kind) in enumerate((("bytes_list", "BytesList"),
                                           ("float_list", "FloatList"),
                                           ("int64_list", "Int64List")), 1):
        feature.field.add(name=name, number=number, label=optional, type=kinds.TYPE_MESSAGE,
                          type_name=f".tensorflow.{kind}", oneof_index=0)
    features = file.message_type.add(name="Features")
    entry = features.nested_type.add(name="FeatureEntry")
    entry.options.map_entry = True
    entry.field.add(name="key", number=1, label=optional, type=kinds.TYPE_STRING)
    entry.field.add(name="value", number=2, label=optional, type=kinds.TYPE_MESSAGE,
                    type_name=".tensorflow.Feature")
    features.field.add(name="feature", number=1, label=repeated, type=kinds.TYPE_MESSAGE,
                       type_name=".tensorflow.Features.FeatureEntry")
    example = file.message_type.add(name="Example")
    example.field.add(name="features", number=1, label=optional, type=kinds.TYPE_MESSAGE,
                      type_name=".tensorflow.Features")
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("tensorflow.Example"))


def protobuf_example(example_class, record, source_id: int) -> bytes:
    """The OD API keys, class ids only (no class/text): names must come from the label map."""
    example = example_class()
    feature = example.features.feature
    encoded = Path(record.source.uri).read_bytes()
    feature["image/encoded"].bytes_list.value.append(encoded)
    feature["image/format"].bytes_list.value.append(b"jpeg")
    feature["image/source_id"].bytes_list.value.append(str(source_id).encode())
    feature["image/height"].int64_list.value.append(record.height)
    feature["image/width"].int64_list.value.append(record.width)
    for coord in ("xmin", "xmax", "ymin", "ymax"):
        feature[f"image/object/bbox/{coord}"].float_list.value.extend(
            getattr(b, coord) for b in record.boxes)
    feature["image/object/class/label"].int64_list.value.extend(
        LABEL_MAP[b.label] for b in record.boxes)
    return example.SerializeToString()


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "unpacked"])
def test_examples_serialized_by_protobuf_with_class_ids_only(tmp_path, sample, packed):
    example_class = _example_classes(packed)
    export = tmp_path / "od-api"
    export.mkdir()
    data = [protobuf_example(example_class, r, i) for i, r in enumerate(sample, 1)]
    write_records(export / "val.tfrecord", data)
    (export / "label_map.pbtxt").write_text(format_label_map(LABEL_MAP))
    summary = ingest([str(export)], tmp_path / "out")
    assert summary["rejected"] == 0, rejections(tmp_path / "out")
    records = manifest(tmp_path / "out")
    assert_same_images(records, sample)
    assert sorted(r.source_id for r in records) == sorted(str(i) for i in range(1, 9))


def _corrupt(example: bytes) -> bytes:
    """One record framed with a data checksum that does not hold."""
    out = io.BytesIO()
    write_record(out, example)
    framed = bytearray(out.getvalue())
    framed[-1] ^= 0xFF
    return bytes(framed)


def _features(record, **override) -> bytes:
    """The OD API keys of `record`, with some features replaced (None: left out)."""
    encoded = Path(record.source.uri).read_bytes()
    features = {
        "image/encoded": bytes_feature([encoded]),
        "image/filename": bytes_feature([record.source_id.encode()]),
        "image/height": int64_feature([record.height]),
        "image/width": int64_feature([record.width]),
        "image/object/bbox/xmin": float_feature([0.1, 0.5]),
        "image/object/bbox/xmax": float_feature([0.4, 0.9]),
        "image/object/bbox/ymin": float_feature([0.1, 0.5]),
        "image/object/bbox/ymax": float_feature([0.4, 0.9]),
        "image/object/class/text": bytes_feature([b"circle", b"square"]),
        "image/object/class/label": int64_feature([1, 2]),
    }
    features.update(override)
    return encode_example({k: v for k, v in features.items() if v is not None})


def test_bad_records_are_rejected_by_record_and_the_rest_flow(tmp_path, sample):
    export = tmp_path / "od-api"
    export.mkdir()
    records = [
        _features(sample[0]),                                                    # 1 good
        None,                                                                    # 2 crc
        b"\xff\xff\xff\xff",                                                     # 3 garbage
        _features(sample[2], **{"image/encoded": None}),                         # 4 no image
        _features(sample[3], **{"image/object/class/text": bytes_feature(
            [b"circle", b"triangle"])}),                                         # 5 mismatch
        _features(sample[4], **{"image/object/is_crowd": int64_feature([0, 1])}),  # 6 crowd
        _features(sample[5], **{"image/object/bbox/ymax": float_feature([0.4])}),  # 7 lengths
        _features(sample[6], **{"image/object/class/label": int64_feature([1, 9]),
                                "image/object/class/text": None}),               # 8 unknown id
        _features(sample[7], **{"image/encoded": bytes_feature([b"<html>oops</html>"])}),
    ]
    with open(export / "mixed.tfrecord", "wb") as fh:
        for index, example in enumerate(records):
            if example is None:
                fh.write(_corrupt(_features(sample[1])))
            else:
                write_record(fh, example)
        fh.write(struct.pack("<Q", 10))  # a cut-off tail: half a header
    (export / "label_map.pbtxt").write_text(format_label_map(LABEL_MAP))
    summary = ingest([str(export)], tmp_path / "out", max_rejected_share=None)
    file = str(export / "mixed.tfrecord")
    got = {r["record"]: r["reason"] for r in rejections(tmp_path / "out")}
    assert {r["file"] for r in rejections(tmp_path / "out")} == {file}
    assert got["record 2"].startswith("corrupt record: data checksum mismatch (byte ")
    assert got["record 3"].startswith("not a tf.train.Example")
    assert got["record 4"].startswith("no image: the Example has no image/encoded")
    assert got["record 5 object[1]"].startswith(
        "class mismatch: image/object/class/text 'triangle' but label 2 is 'square' in ")
    assert got["record 6 object[1]"].startswith("crowd box: image/object/is_crowd=1")
    assert got["record 7"] == ("bad boxes: image/object/bbox/xmin, ymin, xmax, ymax have "
                               "2, 2, 2, 1 values")
    assert got["record 8 object[1]"].startswith("unknown class id: image/object/class/label 9")
    assert got["record 9"].startswith("not an image: image/encoded starts with")
    assert re.fullmatch(r"corrupt TFRecord: truncated record header \(8 of 12 bytes\) at byte "
                        r"\d+; the rest of the file is not read", got["record 10"])
    assert summary["rejections_by_reason"]["corrupt TFRecord"] == 1
    assert len(got) == 9
    kept = {r.source_id: len(r.boxes) for r in manifest(tmp_path / "out")}
    assert kept == {sample[0].source_id: 2, sample[3].source_id: 1, sample[4].source_id: 1,
                    sample[6].source_id: 1}
    assert summary["images"] == 4


def test_gzip_records_with_class_text_and_no_label_map(tmp_path, sample):
    export = tmp_path / "od-api"
    export.mkdir()
    examples = [example_for(r, i, LABEL_MAP) for i, r in enumerate(sample[:3], 1)]
    with gzip.open(export / "train.tfrecord.gz", "wb") as fh:
        for example in examples:
            write_record(fh, example)
    summary = ingest([str(export)], tmp_path / "out")
    assert summary["rejected"] == 0
    assert_same_images(manifest(tmp_path / "out"), sample[:3])


def test_class_ids_without_names_are_a_clear_rejection(tmp_path, sample):
    path = write_records(tmp_path / "a.record",
                         [_features(sample[0], **{"image/object/class/text": None})])
    log = RejectionLog()
    ctx = ParseContext(export_root=tmp_path, images_root=None, log=log,
                       inline_dir=tmp_path / "inline")
    assert list(tfrecord_format.parse([path], ctx)) == []
    reasons = {r.record: r.reason for r in log.items}
    assert reasons["record 1 object[0]"] == ("no class name: no image/object/class/text and "
                                             "no label_map.pbtxt to name "
                                             "image/object/class/label 1")
    assert reasons["record 1"] == "no usable box: image dropped, all 2 boxes refused"


def test_sniffing_claims_tfrecords_and_their_label_map_only(tmp_path, sample):
    """A label_map.pbtxt elsewhere (next to a VOC export) stays unclaimed."""
    records, voc = tmp_path / "records", tmp_path / "voc"
    records.mkdir()
    voc.mkdir()
    shard = write_records(records / "train-00000-of-00001.tfrecord", [_features(sample[0])])
    for folder in (records, voc):
        (folder / "label_map.pbtxt").write_text(format_label_map(LABEL_MAP))
    (records / "notes.record").write_bytes(b"not a record, just a file named like one\n")
    head = lambda path: path.read_bytes()[:4096]  # noqa: E731
    assert detect(shard, head(shard)) == "tfrecord"
    assert detect(records / "label_map.pbtxt", head(records / "label_map.pbtxt")) == "tfrecord"
    assert detect(voc / "label_map.pbtxt", head(voc / "label_map.pbtxt")) is None
    assert detect(records / "notes.record", head(records / "notes.record")) is None


def test_cli_ingests_tfrecords_with_format_flag(tmp_path, sample):
    export = tmp_path / "od-api"
    export.mkdir()
    write_records(export / "train.record", [example_for(r, 1, LABEL_MAP) for r in sample[:2]])
    (export / "label_map.pbtxt").write_text(format_label_map(LABEL_MAP))
    done = odapi("ingest", str(export), "--out", str(tmp_path / "out"), "--format", "tfrecord")
    assert '"images": 2' in done.stdout, done.stdout
    assert_same_images(manifest(tmp_path / "out"), sample[:2])


@pytest.mark.slow
def test_records_written_by_tensorflow_ingest_exactly(tmp_path, sample):
    """The real thing: tf.train.Example + tf.io.TFRecordWriter, as the OD API's tools do."""
    tf = pytest.importorskip("tensorflow")
    export = tmp_path / "od-api"
    export.mkdir()
    with tf.io.TFRecordWriter(str(export / "train.record-00000-of-00001")) as writer:
        for index, record in enumerate(sample, 1):
            feature = {
                "image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(
                    value=[Path(record.source.uri).read_bytes()])),
                "image/filename": tf.train.Feature(bytes_list=tf.train.BytesList(
                    value=[record.source_id.encode()])),
                "image/source_id": tf.train.Feature(bytes_list=tf.train.BytesList(
                    value=[str(index).encode()])),
                "image/height": tf.train.Feature(int64_list=tf.train.Int64List(
                    value=[record.height])),
                "image/width": tf.train.Feature(int64_list=tf.train.Int64List(
                    value=[record.width])),
                "image/object/class/text": tf.train.Feature(bytes_list=tf.train.BytesList(
                    value=[b.label.encode() for b in record.boxes])),
                "image/object/class/label": tf.train.Feature(int64_list=tf.train.Int64List(
                    value=[LABEL_MAP[b.label] for b in record.boxes])),
                **{f"image/object/bbox/{c}": tf.train.Feature(float_list=tf.train.FloatList(
                    value=[getattr(b, c) for b in record.boxes]))
                   for c in ("xmin", "xmax", "ymin", "ymax")},
            }
            example = tf.train.Example(features=tf.train.Features(feature=feature))
            writer.write(example.SerializeToString())
    (export / "label_map.pbtxt").write_text(format_label_map(LABEL_MAP))
    summary = ingest([str(export)], tmp_path / "out")
    assert summary["rejected"] == 0, rejections(tmp_path / "out")
    assert_same_images(manifest(tmp_path / "out"), sample)


def test_each_split_uses_the_label_map_beside_its_records(tmp_path, sample):
    """Roboflow's TFRecord export: `<split>/<name>.tfrecord` + `<split>/<name>_label_map.pbtxt`;
    two label maps that number the classes differently each name their own split's ids."""
    export = tmp_path / "roboflow"
    orders = {"train": LABEL_MAP, "valid": {name: 4 - i for name, i in LABEL_MAP.items()}}
    for split, label_map in orders.items():
        (export / split).mkdir(parents=True)
        (export / split / "shapes_label_map.pbtxt").write_text(format_label_map(label_map))
        part = sample[:4] if split == "train" else sample[4:]
        write_records(export / split / "shapes.tfrecord",
                      [_ids_only(example_for(r, i, label_map)) for i, r in enumerate(part, 1)])
    summary = ingest([str(export)], tmp_path / "out")
    assert summary["rejected"] == 0, rejections(tmp_path / "out")
    assert_same_images(manifest(tmp_path / "out"), sample)


def _ids_only(example: bytes) -> bytes:
    """`example` without image/object/class/text: only the label map can name its ids."""
    from odapi_operators.core.data.tfrecord import decode_example

    features = decode_example(example)
    encoders = {bytes: bytes_feature, float: float_feature, int: int64_feature}
    return encode_example({key: encoders[type(values[0])](values)
                           for key, values in features.items()
                           if values and key != "image/object/class/text"})
