"""Benchmark: odapi's TensorFlow-free Example/TFRecord writer vs TensorFlow's own.

Same verified sample images, same features; prints records/s of each and the ratio, plus the
start-up cost each pays (importing TensorFlow vs not). Both outputs are compared byte for
byte after parsing, so the speed is for identical results.

    .venv/bin/python bench/tfrecord_writer.py [--images 400] [--repeat 5]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _prepare(tmp: Path, count: int):
    from odapi_operators.core.data.fetch import fetch_images
    from odapi_operators.core.data.ingest import ingest
    from odapi_operators.core.data.label_map import build_label_map
    from odapi_operators.core.data.manifest import read_manifest
    from odapi_operators.core.data.sample_data import generate
    from odapi_operators.core.data.verify import verify_images

    generate(tmp / "export", count=count, seed=0)
    ingest([str(tmp / "export")], tmp / "ingest")
    fetch_images(tmp / "ingest" / "manifest.jsonl", tmp / "images")
    verify_images(tmp / "images" / "manifest.jsonl", tmp / "verify")
    build_label_map(tmp / "verify" / "manifest.jsonl", tmp / "lm")
    from odapi_operators.core.data.label_map import read_label_map
    return list(read_manifest(tmp / "verify" / "manifest.jsonl")), read_label_map(
        tmp / "lm" / "label_map.pbtxt")


def _ours(records, label_map, path: Path) -> None:
    from odapi_operators.core.data.shard import example_for
    from odapi_operators.core.data.tfrecord import write_record

    with open(path, "wb") as out:
        for i, record in enumerate(records, start=1):
            write_record(out, example_for(record, i, label_map))


def _tensorflow(records, label_map, path: Path) -> None:
    import hashlib

    import tensorflow as tf

    def b(v): return tf.train.Feature(bytes_list=tf.train.BytesList(value=v))
    def f(v): return tf.train.Feature(float_list=tf.train.FloatList(value=v))
    def n(v): return tf.train.Feature(int64_list=tf.train.Int64List(value=v))

    with tf.io.TFRecordWriter(str(path)) as writer:
        for i, r in enumerate(records, start=1):
            data = Path(r.source.uri).read_bytes()
            boxes = r.boxes
            feature = {
                "image/encoded": b([data]), "image/format": b([b"jpeg"]),
                "image/filename": b([r.source_id.encode()]), "image/source_id": b([str(i).encode()]),
                "image/key/sha256": b([hashlib.sha256(data).hexdigest().encode()]),
                "image/height": n([r.height]), "image/width": n([r.width]),
                "image/object/bbox/xmin": f([x.xmin for x in boxes]),
                "image/object/bbox/xmax": f([x.xmax for x in boxes]),
                "image/object/bbox/ymin": f([x.ymin for x in boxes]),
                "image/object/bbox/ymax": f([x.ymax for x in boxes]),
                "image/object/class/text": b([x.label.encode() for x in boxes]),
                "image/object/class/label": n([label_map[x.label] for x in boxes]),
                "image/object/area": f([(x.xmax - x.xmin) * r.width * (x.ymax - x.ymin) * r.height
                                        for x in boxes]),
                "image/object/is_crowd": n([0] * len(boxes)),
            }
            writer.write(tf.train.Example(features=tf.train.Features(feature=feature))
                         .SerializeToString())


def _best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def _import_seconds(module: str) -> float:
    code = f"import time; t = time.perf_counter(); import {module}; print(time.perf_counter() - t)"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        records, label_map = _prepare(tmp, args.images)
        ours = _best(lambda: _ours(records, label_map, tmp / "ours.tfrecord"), args.repeat)
        theirs = _best(lambda: _tensorflow(records, label_map, tmp / "tf.tfrecord"), args.repeat)
        import tensorflow as tf

        a = [tf.train.Example.FromString(x.numpy()) for x in
             tf.data.TFRecordDataset(str(tmp / "ours.tfrecord"))]
        b = [tf.train.Example.FromString(x.numpy()) for x in
             tf.data.TFRecordDataset(str(tmp / "tf.tfrecord"))]
        assert a == b, "the two writers produced different Examples"
    print(f"images: {len(records)} (identical Examples from both writers)")
    print(f"odapi writer:      {len(records) / ours:9.0f} records/s")
    print(f"tf.io writer:      {len(records) / theirs:9.0f} records/s")
    print(f"ratio (odapi/tf):  {theirs / ours:9.2f}x")
    print(f"start-up: import odapi_operators.core.data.tfrecord "
          f"{_import_seconds('odapi_operators.core.data.tfrecord'):.2f} s vs import tensorflow "
          f"{_import_seconds('tensorflow'):.2f} s")


if __name__ == "__main__":
    main()
