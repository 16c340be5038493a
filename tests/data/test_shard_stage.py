"""Sharding at scale: size-targeted counts, one-shard writes for mapped tasks, content cache,
a task killed mid-shard, a full disk, flat memory, and TF-Vision reading the result."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from odapi_operators.core.data import shard as shard_module
from odapi_operators.core.data.label_map import format_label_map
from odapi_operators.core.data.manifest import Box, ImageRecord, ImageSource, write_manifest
from odapi_operators.core.data.shard import (
    finish_shards,
    plan_shards,
    shard_name,
    write_shard,
    write_shards,
)
from odapi_operators.core.rejections import StageError

from support.hostile_inputs import tiny_filesystem

RATIOS = {"train": 0.75, "val": 0.25}
LABELS = {"cat": 1, "dog": 2}


def make_dataset(root: Path, count: int, side: int = 48,
                 name: str = "m.jsonl") -> tuple[Path, Path]:
    """`count` noise JPEGs (incompressible, so sizes are predictable) and their manifest."""
    images = root / "img"
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    records = []
    for i in range(count):
        path = images / f"{i:05d}.jpg"
        if not path.exists():
            Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(
                path, quality=90)
        boxes = tuple(Box("cat" if j % 2 else "dog", 0.1, 0.1, 0.2 + 0.1 * j, 0.6)
                      for j in range(i % 3))
        records.append(ImageRecord(f"img{i:05d}", ImageSource("local", str(path)), f"{i}.jpg",
                                   side, side, boxes))
    write_manifest(root / name, records)
    label_map = root / "label_map.pbtxt"
    label_map.write_text(format_label_map(LABELS))
    return root / name, label_map


def shard_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.tfrecord"))}


def test_shard_count_from_target_size(tmp_path):
    manifest, label_map = make_dataset(tmp_path, 60)
    image_bytes = sum(p.stat().st_size for p in (tmp_path / "img").iterdir())
    target = image_bytes // 6
    summary = write_shards(manifest, label_map, tmp_path / "rec", RATIOS, None,
                           target_shard_bytes=target, workers=2)
    train, val = summary["splits"]["train"], summary["splits"]["val"]
    assert train["images"] + val["images"] == 60
    from odapi_operators.core.data.split import split_of

    estimate = sum(p.stat().st_size + shard_module.RECORD_OVERHEAD
                   for p in (tmp_path / "img").iterdir()
                   if split_of(f"img{p.stem}", RATIOS) == "train")
    assert train["shards"] == -(-estimate // target)  # ceil(image bytes / target)
    assert train["shards"] >= 3 and val["shards"] >= 1
    for path in (tmp_path / "rec").glob("train-*.tfrecord"):
        assert path.stat().st_size < 1.5 * target
    stats = json.loads((tmp_path / "rec" / "train.stats.json").read_text())
    assert stats["images"] == train["images"] and set(stats["per_class"]) <= {"cat", "dog"}
    assert stats["bytes"] == sum(p.stat().st_size
                                 for p in (tmp_path / "rec").glob("train-*.tfrecord"))


def test_one_shard_at_a_time_equals_all_at_once(tmp_path):
    """The mapped-task path (plan, write_shard per shard, finish) gives identical files."""
    manifest, label_map = make_dataset(tmp_path, 30)
    shards = {"train": 3, "val": 2}
    together = write_shards(manifest, label_map, tmp_path / "together", RATIOS, shards)
    plan = plan_shards(manifest, label_map, RATIOS, shards)
    assert [(s["split"], s["index"], s["count"]) for s in plan["shards"]] == \
        [("train", 0, 3), ("train", 1, 3), ("train", 2, 3), ("val", 0, 2), ("val", 1, 2)]
    for spec in reversed(plan["shards"]):  # any order, as mapped tasks finish
        stats = write_shard(manifest, label_map, tmp_path / "mapped", RATIOS, spec["split"],
                            spec["index"], spec["count"], counts=plan["counts"])
        assert stats["shard"] == shard_name(spec["split"], spec["index"], spec["count"])
    mapped = finish_shards(manifest, label_map, tmp_path / "mapped", RATIOS, plan["counts"],
                           plan["fingerprint"])
    assert shard_files(tmp_path / "mapped") == shard_files(tmp_path / "together")
    assert mapped["splits"]["train"]["images"] == together["splits"]["train"]["images"]
    assert (tmp_path / "mapped" / "source_ids.json").read_text() == \
        (tmp_path / "together" / "source_ids.json").read_text()


def test_finish_refuses_missing_shard(tmp_path):
    manifest, label_map = make_dataset(tmp_path, 10)
    write_shard(manifest, label_map, tmp_path / "rec", RATIOS, "train", 0, 2,
                counts={"train": 2, "val": 1})
    with pytest.raises(StageError, match="train-00001-of-00002.tfrecord is missing"):
        finish_shards(manifest, label_map, tmp_path / "rec", RATIOS, {"train": 2, "val": 1})


def test_same_inputs_reuse_shards(tmp_path):
    manifest, label_map = make_dataset(tmp_path, 20)
    first = write_shards(manifest, label_map, tmp_path / "rec", RATIOS, {"train": 2, "val": 1})
    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "rec").glob("*.tfrecord")}
    second = write_shards(manifest, label_map, tmp_path / "rec", RATIOS, {"train": 2, "val": 1})
    assert (first["cached"], second["cached"]) == (False, True)
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "rec").glob("*.tfrecord")} == stamps
    third = write_shards(manifest, label_map, tmp_path / "rec", RATIOS, {"train": 3, "val": 1})
    assert third["cached"] is False  # another layout is another dataset of shards
    assert sorted(p.name for p in (tmp_path / "rec").glob("train-*.tfrecord")) == \
        [shard_name("train", i, 3) for i in range(3)]  # the old layout's shards are gone


def test_content_cache_across_runs(tmp_path):
    manifest, label_map = make_dataset(tmp_path, 20)
    cache = tmp_path / "cache"
    first = write_shards(manifest, label_map, tmp_path / "run1", RATIOS, None, cache_dir=cache)
    # the next run's manifest is another file (other paths), same content
    copy = tmp_path / "run2-manifest.jsonl"
    copy.write_text(manifest.read_text())
    second = write_shards(copy, label_map, tmp_path / "run2", RATIOS, None, cache_dir=cache)
    assert (first["cached"], second["cached"]) == (False, True)
    assert second["fingerprint"] == first["fingerprint"]
    assert shard_files(tmp_path / "run2") == shard_files(tmp_path / "run1")
    name = shard_name("train", 0, 1)
    assert (tmp_path / "run2" / name).stat().st_ino == (cache / first["fingerprint"] / name
                                                        ).stat().st_ino  # linked, not copied
    assert second["splits"]["train"]["pattern"] == str(tmp_path / "run2" / "train-*.tfrecord")


def test_source_id_space_is_enforced(tmp_path, monkeypatch):
    manifest, label_map = make_dataset(tmp_path, 6)
    monkeypatch.setattr(shard_module, "MAX_SOURCE_ID", 5)
    with pytest.raises(ValueError, match="6 images exceed the source-id space"):
        write_shards(manifest, label_map, tmp_path / "rec", RATIOS, None)


SLOW_WRITER = """
import sys, time
from odapi_operators.core.data import shard
original = shard.example_for
def slow(*args):
    time.sleep(0.01)
    return original(*args)
shard.example_for = slow
shard.write_shards(sys.argv[1], sys.argv[2], sys.argv[3], {"train": 0.75, "val": 0.25},
                   {"train": 4, "val": 2}, workers=2)
"""


def test_task_killed_mid_shard_leaves_no_partial_shard(tmp_path):
    manifest, label_map = make_dataset(tmp_path, 400, side=32)
    out = tmp_path / "rec"
    child = subprocess.Popen([sys.executable, "-c", SLOW_WRITER, str(manifest), str(label_map),
                              str(out)], start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not any(out.glob(".tmp-*")):
        time.sleep(0.01)
    time.sleep(0.5)  # well into the shards, not yet done
    os.killpg(child.pid, signal.SIGKILL)  # the task and its writer processes, as a lost pod
    child.wait()
    assert child.returncode == -signal.SIGKILL
    assert any(out.glob(".tmp-*")), "killed after the shards were complete"
    assert not list(out.glob("*.tfrecord")), "a shard that was not complete became visible"
    assert not (out / "summary.json").exists()
    summary = write_shards(manifest, label_map, out, RATIOS, {"train": 4, "val": 2}, workers=2)
    assert not list(out.glob(".tmp-*"))  # the dead run's temporaries are swept
    clean = write_shards(manifest, label_map, tmp_path / "clean", RATIOS, {"train": 4, "val": 2})
    assert shard_files(out) == shard_files(tmp_path / "clean")
    assert summary["splits"] == {k: {**v, "pattern": str(out / f"{k}-*.tfrecord")}
                                 for k, v in clean["splits"].items()}


def test_full_disk_fails_clearly_and_leaves_no_shard(tmp_path):
    manifest, label_map = make_dataset(tmp_path, 40, side=64)  # ~4 kB each, ~160 kB in all
    with tiny_filesystem(tmp_path / "disk", "64k") as disk:
        with pytest.raises(StageError, match=r"shard: writing .*\.tfrecord failed: "
                                             r"No space left on device"):
            write_shards(manifest, label_map, disk / "rec", RATIOS, {"train": 1, "val": 1},
                         workers=1)
        assert not list((disk / "rec").glob("*.tfrecord"))
        assert not list((disk / "rec").glob(".tmp-*"))


def test_peak_memory_flat_in_dataset_size(tmp_path):
    def peak(count: int) -> int:
        manifest, label_map = make_dataset(tmp_path, count, side=64, name=f"m{count}.jsonl")
        tracemalloc.start()
        write_shards(manifest, label_map, tmp_path / f"rec{count}", RATIOS,
                     {"train": 2, "val": 1}, workers=1)
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return top

    small, large = peak(50), peak(400)
    assert large < 1.5 * small + 200_000, (small, large)  # 8x the images, not 8x the memory


def test_tf_vision_decoder_reads_size_targeted_shards(tmp_path):
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    import tensorflow as tf
    from official.vision.dataloaders.tf_example_decoder import TfExampleDecoder

    manifest, label_map = make_dataset(tmp_path, 24)
    summary = write_shards(manifest, label_map, tmp_path / "rec", RATIOS, None,
                           target_shard_bytes=8_000)
    decoder = TfExampleDecoder()
    ids, n = json.loads((tmp_path / "rec" / "source_ids.json").read_text()), 0
    for split, stats in summary["splits"].items():
        files = tf.io.gfile.glob(stats["pattern"])
        assert len(files) == stats["shards"] > 1
        for raw in tf.data.TFRecordDataset(files):
            decoded = decoder.decode(raw)
            source_id = decoded["source_id"].numpy().decode()
            assert 0 < int(tf.strings.to_number(decoded["source_id"], tf.int64)) < 2**22
            key = ids[source_id]["key"]
            i = int(key[3:])
            assert ids[source_id]["split"] == split
            assert decoded["groundtruth_classes"].numpy().tolist() == \
                [LABELS["cat" if j % 2 else "dog"] for j in range(i % 3)]
            assert tuple(decoded["image"].shape) == (48, 48, 3)
            n += 1
    assert n == 24


def with_hashes(manifest: Path, keep=lambda record: True, name: str | None = None) -> Path:
    """`manifest`'s records that `keep` accepts, each with its image's sha256 (what verify
    hands on), written as `name` beside it."""
    import hashlib

    from odapi_operators.core.data.manifest import read_manifest

    records = [r.with_source(r.source, provenance={
        "sha256": hashlib.sha256(Path(r.source.uri).read_bytes()).hexdigest()})
        for r in read_manifest(manifest) if keep(r)]
    out = manifest.with_name(name or f"hashed-{manifest.name}")
    write_manifest(out, records)
    return out


def test_an_example_renumbered_is_the_example_encoded_with_that_id(tmp_path):
    from odapi_operators.core.data.examples import renumbered
    from odapi_operators.core.data.manifest import read_manifest

    manifest, _ = make_dataset(tmp_path, 3)
    for record in read_manifest(manifest):
        for old, new in ((1, 2), (9, 10), (127, 128), (5, 4_194_303)):
            before = shard_module.example_for(record, old, LABELS)
            assert renumbered(before, old, new, record.width) == \
                shard_module.example_for(record, new, LABELS)
        assert renumbered(before, 7, 8, record.width) is None  # not the id it was written with


def test_a_grown_dataset_reuses_the_examples_of_the_last_layout(tmp_path):
    """Run 2 adds images between run 1's (in key order): every source id after an insertion
    moves, yet the unchanged images' Examples come from run 1's shards, and the shards are
    byte for byte those of a run with nothing to reuse."""
    grown, label_map = make_dataset(tmp_path, 44)
    grown = with_hashes(grown)
    first = with_hashes(grown, keep=lambda r: int(r.key[3:]) % 11 != 5, name="first.jsonl")
    cache = tmp_path / "cache"
    one = write_shards(first, label_map, tmp_path / "run1", RATIOS, {"train": 3, "val": 1},
                       cache_dir=cache, workers=2)
    assert one["reused_images"] == 0
    two = write_shards(grown, label_map, tmp_path / "run2", RATIOS, {"train": 3, "val": 1},
                       cache_dir=cache, workers=2)
    assert two["reused_images"] == 40  # 4 of the 44 are new
    alone = write_shards(grown, label_map, tmp_path / "alone", RATIOS, {"train": 3, "val": 1})
    assert shard_files(tmp_path / "run2") == shard_files(tmp_path / "alone")
    lists = {folder: {p.name: p.read_text() for p in (tmp_path / folder).glob(
        ".shard-stats/*.examples")} for folder in ("run2", "alone")}
    assert lists["run2"] == lists["alone"] and len(lists["run2"]) == 4

    # relabelled images and a damaged shard of the layout published last are encoded again
    damaged = cache / two["fingerprint"] / shard_name("val", 0, 1)
    damaged.unlink()  # replaced, as every file there is: run 2's own shard is a link of it
    damaged.write_bytes(b"\0" * 64)
    relabelled = tmp_path / "relabelled.jsonl"
    from odapi_operators.core.data.manifest import read_manifest

    write_manifest(relabelled, [r.with_source(r.source, boxes=r.boxes[:1])
                                if r.key == "img00002" else r for r in read_manifest(grown)])
    three = write_shards(relabelled, label_map, tmp_path / "run3", RATIOS,
                         {"train": 3, "val": 1}, cache_dir=cache, workers=1)
    from odapi_operators.core.data.split import split_of

    train = [f"img{i:05d}" for i in range(44) if split_of(f"img{i:05d}", RATIOS) == "train"]
    assert three["reused_images"] == len(train) - ("img00002" in train)
    fresh = write_shards(relabelled, label_map, tmp_path / "fresh", RATIOS,
                         {"train": 3, "val": 1})
    assert shard_files(tmp_path / "run3") == shard_files(tmp_path / "fresh")
    assert three["splits"] == {k: {**v, "pattern": str(tmp_path / "run3" / f"{k}-*.tfrecord")}
                               for k, v in fresh["splits"].items()}
