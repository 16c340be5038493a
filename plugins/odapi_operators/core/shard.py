"""Records stage: verified manifest -> sharded TFRecords per split, OD API / TF-Vision keys.

`image/source_id` must be a small decimal integer (TF-Vision's eval parser converts it with
`tf.strings.to_number` to int64 via float32): ids are assigned 1..N in image-key order and the
mapping back to image keys is kept in `source_ids.json`. The stage folder is written
atomically, so a killed run never leaves a half shard behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections import Counter, defaultdict
from pathlib import Path

from odapi_operators.core import storage
from odapi_operators.core.label_map import read_label_map
from odapi_operators.core.manifest import ImageRecord, read_manifest
from odapi_operators.core.split import split_of
from odapi_operators.core.tfrecord import (bytes_feature, encode_example, float_feature,
                                           int64_feature, write_record)

MAX_SOURCE_ID = 2**22


def shard_name(split: str, index: int, count: int) -> str:
    return f"{split}-{index:05d}-of-{count:05d}.tfrecord"


def example_for(record: ImageRecord, source_id: int, label_map: dict[str, int]) -> bytes:
    """Serialized tf.train.Example for one verified image record."""
    encoded = Path(record.source.uri).read_bytes()
    fmt = b"png" if encoded[:8] == b"\x89PNG\r\n\x1a\n" else b"jpeg"
    width, height = int(record.width), int(record.height)
    boxes = record.boxes
    try:
        labels = [label_map[b.label] for b in boxes]
    except KeyError as exc:
        raise ValueError(f"{record.key}: class {exc} is not in the label map") from None
    return encode_example({
        "image/encoded": bytes_feature([encoded]),
        "image/format": bytes_feature([fmt]),
        "image/filename": bytes_feature([record.source_id.encode()]),
        "image/source_id": bytes_feature([str(source_id).encode()]),
        "image/key/sha256": bytes_feature([hashlib.sha256(encoded).hexdigest().encode()]),
        "image/height": int64_feature([height]),
        "image/width": int64_feature([width]),
        "image/object/bbox/xmin": float_feature([b.xmin for b in boxes]),
        "image/object/bbox/xmax": float_feature([b.xmax for b in boxes]),
        "image/object/bbox/ymin": float_feature([b.ymin for b in boxes]),
        "image/object/bbox/ymax": float_feature([b.ymax for b in boxes]),
        "image/object/class/text": bytes_feature([b.label.encode() for b in boxes]),
        "image/object/class/label": int64_feature(labels),
        "image/object/area": float_feature(
            [(b.xmax - b.xmin) * width * (b.ymax - b.ymin) * height for b in boxes]),
        "image/object/is_crowd": int64_feature([0] * len(boxes)),
    })


def write_shards(manifest: str | Path, label_map_path: str | Path, out_dir: str | Path,
                 ratios: dict[str, float], shards: dict[str, int]) -> dict:
    """Write `<split>-NNNNN-of-NNNNN.tfrecord` files plus per-split stats; return the summary."""
    label_map = read_label_map(label_map_path)
    records = sorted(read_manifest(manifest), key=lambda r: r.key)
    if len(records) >= MAX_SOURCE_ID:
        raise ValueError(f"{len(records)} images exceed the source-id space ({MAX_SOURCE_ID})")
    stats: dict[str, dict] = defaultdict(lambda: {"images": 0, "boxes": 0, "bytes": 0,
                                                  "per_class": Counter()})
    source_ids = {}
    with storage.atomic_directory(out_dir) as tmp, contextlib.ExitStack() as stack:
        writers = {split: [stack.enter_context(open(tmp / shard_name(split, i, n), "wb"))
                           for i in range(n)]
                   for split, n in shards.items() if n > 0}
        for source_id, record in enumerate(records, start=1):
            split = split_of(record.key, ratios)
            if split not in writers:
                continue
            split_stats = stats[split]
            writer = writers[split][split_stats["images"] % len(writers[split])]
            split_stats["bytes"] += write_record(writer, example_for(record, source_id, label_map))
            split_stats["images"] += 1
            split_stats["boxes"] += len(record.boxes)
            split_stats["per_class"].update(b.label for b in record.boxes)
            source_ids[source_id] = {"key": record.key, "split": split,
                                     "source_id": record.source_id}
        stack.close()
        summary = {
            "splits": {split: {**stats[split], "per_class": dict(stats[split]["per_class"]),
                               "pattern": str(Path(out_dir) / f"{split}-*.tfrecord")}
                       for split in writers},
            "label_map": str(label_map_path),
            "num_classes": max(label_map.values()),
        }
        storage.write_text(tmp / "source_ids.json", json.dumps(source_ids))
        storage.write_text(tmp / "summary.json", json.dumps(summary, indent=2))
    return summary
