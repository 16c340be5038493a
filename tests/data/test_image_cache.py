"""Work reused across runs (issue #13): a new run folder over a grown dataset fetches and
decodes only the new or changed images; everything else comes from the image cache."""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import pytest
from PIL import Image

from odapi_operators.core.data.download import DownloadPolicy
from odapi_operators.core.data.fetch import fetch_images
from odapi_operators.core.data.image_cache import place
from odapi_operators.core.data.manifest import (
    Box,
    ImageRecord,
    ImageSource,
    read_manifest,
    write_manifest,
)
from odapi_operators.core.data.verify import verify_images

from support.image_server import ImageServer, send

FAST = DownloadPolicy(connect_timeout=2, read_timeout=2, deadline=5, retries=1, backoff=0.01)


def jpeg(seed: int, size=(96, 64)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (seed * 37 % 256, seed * 91 % 256, 120)).save(buf, "JPEG")
    return buf.getvalue()


BOX = Box("thing", 0.1, 0.1, 0.5, 0.5)


def record(key: str, kind: str, uri: str, md5: str | None = None) -> ImageRecord:
    return ImageRecord(key=key, source=ImageSource(kind, uri), source_id=key, width=None,
                       height=None, boxes=(BOX,), provenance={}, md5=md5)


def manifest(path: Path, records: list[ImageRecord]) -> Path:
    write_manifest(path, records)
    return path


def prepare(root: Path, run: str, source: Path, cache: Path, max_side: int = 48,
            threads: int = 4) -> tuple[dict, dict]:
    """Fetch then verify `source` into the run folder `root/run`, with the shared cache."""
    fetched = fetch_images(source, root / run / "images", threads=threads, policy=FAST,
                           cache_dir=cache)
    verified = verify_images(fetched["manifest"], root / run / "verify", max_side=max_side,
                             workers=1, cache_dir=cache)
    return fetched, verified


def outputs(verified: dict) -> dict[str, bytes]:
    return {r.key: Path(r.source.uri).read_bytes() for r in read_manifest(verified["manifest"])}


@pytest.fixture
def server():
    with ImageServer() as running:
        yield running


def test_a_new_run_fetches_and_decodes_only_new_images(tmp_path, server):
    for i in range(4):
        server.routes[f"/{i}.jpg"] = send(jpeg(i))
    old = [record(f"k{i}", "url", server.url(f"/{i}.jpg")) for i in range(3)]
    cache = tmp_path / "cache"
    first = manifest(tmp_path / "m1.jsonl", old)
    fetched1, verified1 = prepare(tmp_path, "run1", first, cache)
    assert (fetched1["downloaded"], fetched1["reused"], verified1["reused"]) == (3, 0, 0)

    grown = manifest(tmp_path / "m2.jsonl",
                     [*old, record("k3", "url", server.url("/3.jpg"))])
    fetched2, verified2 = prepare(tmp_path, "run2", grown, cache)
    assert {path: n for path, n in server.counts.items()} == \
        {"/0.jpg": 1, "/1.jpg": 1, "/2.jpg": 1, "/3.jpg": 1}  # only the new one asked for
    assert (fetched2["downloaded"], fetched2["reused"], fetched2["requests"]) == (1, 3, 1)
    assert (verified2["ok"], verified2["reused"], verified2["skipped"]) == (4, 3, 0)
    again = outputs(verified2)
    assert {k: again[k] for k in outputs(verified1)} == outputs(verified1)
    # the run's files are its own names, linked to the cache's copy (no second copy on disk)
    stored = Path(next(read_manifest(fetched2["manifest"])).source.uri)
    assert stored.parent == tmp_path / "run2/images/files" and stored.stat().st_nlink > 1


def test_same_key_with_new_bytes_is_fetched_and_decoded_again(tmp_path, server):
    server.routes["/a.jpg"] = send(jpeg(1))
    server.routes["/a-v2.jpg"] = send(jpeg(2, size=(128, 64)))
    cache = tmp_path / "cache"
    md5 = hashlib.md5(jpeg(1)).hexdigest()
    prepare(tmp_path, "run1", manifest(tmp_path / "m1.jsonl",
                                       [record("a", "url", server.url("/a.jpg"), md5)]), cache)
    # a new URL for the key (what exports do when an image is replaced) ...
    fetched, verified = prepare(tmp_path, "run2", manifest(
        tmp_path / "m2.jsonl", [record("a", "url", server.url("/a-v2.jpg"))]), cache)
    assert (fetched["downloaded"], fetched["reused"], verified["reused"]) == (1, 0, 0)
    assert Image.open(io.BytesIO(outputs(verified)["a"])).size == (48, 24)
    # ... or the same URL with another md5 in the export: asked for again, refused as a mismatch
    other_md5 = hashlib.md5(jpeg(3)).hexdigest()
    with pytest.raises(Exception, match="no image could be fetched"):
        prepare(tmp_path, "run3", manifest(
            tmp_path / "m3.jsonl", [record("a", "url", server.url("/a.jpg"), other_md5)]), cache)
    assert server.counts["/a.jpg"] == 2  # asked again (an md5 mismatch is not retried)


def test_a_local_file_rewritten_in_place_is_redone(tmp_path):
    image = tmp_path / "export" / "a.jpg"
    image.parent.mkdir()
    image.write_bytes(jpeg(1))
    source = manifest(tmp_path / "m.jsonl", [record("a", "local", str(image))])
    cache = tmp_path / "cache"
    _, verified1 = prepare(tmp_path, "run1", source, cache)
    fetched2, verified2 = prepare(tmp_path, "run2", source, cache)
    assert (fetched2["copied"], fetched2["reused"], verified2["reused"]) == (0, 1, 1)
    assert outputs(verified2) == outputs(verified1)

    image.write_bytes(jpeg(2, size=(128, 64)))  # same key, same path, new bytes
    os.utime(image, ns=(1, 1))  # even with an older mtime: the size and mtime differ
    fetched3, verified3 = prepare(tmp_path, "run3", source, cache)
    assert (fetched3["copied"], fetched3["reused"], verified3["reused"]) == (1, 0, 0)
    assert Image.open(io.BytesIO(outputs(verified3)["a"])).size == (48, 24)
    # the first version's outputs are untouched: runs share inodes, never overwrite them
    assert outputs(verified1)["a"] == outputs(verified2)["a"]


def test_other_verify_options_decode_again(tmp_path):
    image = tmp_path / "a.jpg"
    image.write_bytes(jpeg(1))
    source = manifest(tmp_path / "m.jsonl", [record("a", "local", str(image))])
    cache = tmp_path / "cache"
    prepare(tmp_path, "run1", source, cache, max_side=48)
    _, verified = prepare(tmp_path, "run2", source, cache, max_side=32)
    assert verified["reused"] == 0
    assert Image.open(io.BytesIO(outputs(verified)["a"])).size == (32, 21)
    _, verified = prepare(tmp_path, "run3", source, cache, max_side=48)
    assert verified["reused"] == 1


def test_a_lost_cache_copy_is_fetched_again(tmp_path, server):
    server.routes["/a.jpg"] = send(jpeg(1))
    source = manifest(tmp_path / "m.jsonl", [record("a", "url", server.url("/a.jpg"))])
    cache = tmp_path / "cache"
    prepare(tmp_path, "run1", source, cache)
    for path in (cache / "objects").rglob("*"):
        if path.is_file():
            path.unlink()
    fetched, verified = prepare(tmp_path, "run2", source, cache)
    assert (fetched["downloaded"], fetched["reused"], verified["reused"]) == (1, 0, 0)
    assert server.counts["/a.jpg"] == 2


def test_no_cache_keeps_runs_apart(tmp_path, server):
    server.routes["/a.jpg"] = send(jpeg(1))
    source = manifest(tmp_path / "m.jsonl", [record("a", "url", server.url("/a.jpg"))])
    for run in ("run1", "run2"):
        fetched = fetch_images(source, tmp_path / run, threads=2, policy=FAST)
        assert fetched["reused"] == 0
    assert server.counts["/a.jpg"] == 2


def test_place_is_atomic_and_makes_the_folder(tmp_path):
    source = tmp_path / "s.bin"
    source.write_bytes(b"x" * 10)
    target = tmp_path / "new" / "dir" / "t.bin"
    assert place(source, target) and target.read_bytes() == b"x" * 10
    assert not place(tmp_path / "missing", tmp_path / "new" / "u.bin")
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == ["dir"]  # no temporaries


def test_stages_report_reuse_across_run_folders(tmp_path):
    """Through the stage functions, as the DAG runs them: run 2 is a new run folder."""
    from odapi_operators.core.config import load_pipeline_config
    from odapi_operators.core.data.sample_data import generate
    from odapi_operators.core.stages.runner import run_stage

    generate(tmp_path / "export", count=6, seed=5, max_side=96)
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(json.dumps({
        "home": str(tmp_path), "exports": {"path": str(tmp_path / "export")},
        "images": {"max_side": 64, "workers": 1},
        "records": {"shards": {"train": 1, "val": 1}, "workers": 1},
        "train": {"model_config": "m.yaml", "steps": 1},
        "serving": {"base": "serving", "model_name": "shapes"}}))
    config = load_pipeline_config(pipeline)
    assert config.images.cache == str(tmp_path / "var/image-cache")
    ingested = run_stage("ingest", pipeline=config, run_id="r1",
                         inputs={"exports": [str(tmp_path / "export")]}, log=lambda _: None)

    def data_stages(run_id: str, source: str = ingested.manifest) -> list:
        def stage(name: str, **inputs):
            return run_stage(name, pipeline=config, run_id=run_id, inputs=inputs,
                             log=lambda _: None)
        fetched = stage("fetch", manifest=source)
        verified = stage("verify", manifest=fetched.manifest)
        mapped = stage("label_map", manifest=verified.manifest)
        return [fetched, verified,
                stage("shard", manifest=verified.manifest, label_map=mapped.label_map)]

    fetched1, verified1, _ = data_stages("r1")
    fetched2, verified2, _ = data_stages("r2")
    assert (fetched1.reused, verified1.reused) == (0, 0)
    assert (fetched2.reused, verified2.reused, verified2.ok) == (6, 6, 6)
    assert "6 reused from earlier runs" in fetched2.log_line()
    runs = tmp_path / "var/runs"
    for split in ("train", "val"):  # the same records, byte for byte
        name = f"{split}-00000-of-00001.tfrecord"
        assert (runs / "r1/records" / name).read_bytes() == \
            (runs / "r2/records" / name).read_bytes()

    # the same images re-labelled: nothing is fetched or decoded, the records carry new boxes
    relabelled = tmp_path / "relabelled.jsonl"
    records = list(read_manifest(ingested.manifest))
    write_manifest(relabelled, [r.with_source(r.source, boxes=tuple(
        Box("hexagon", b.xmin, b.ymin, b.xmax, b.ymax) for b in r.boxes)) for r in records])
    fetched3, verified3, records3 = data_stages("r3", str(relabelled))
    assert (fetched3.reused, verified3.reused) == (6, 6)
    assert {label for r in read_manifest(verified3.manifest) for label in
            (b.label for b in r.boxes)} == {"hexagon"}
    assert not records3.cached
    boxes = sum(len(r.boxes) for r in records)
    assert sum(s["per_class"].get("hexagon", 0) for s in records3.splits.values()) == boxes


def test_place_over_a_link_of_the_same_file_leaves_no_temporary(tmp_path):
    source = tmp_path / "s.bin"
    source.write_bytes(b"x")
    os.link(source, tmp_path / "t.bin")
    assert place(source, tmp_path / "t.bin")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.bin", "t.bin"]
