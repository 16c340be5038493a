"""storage and exports on gs://, against a real GCS emulator (gcp-storage-emulator) on loopback."""

from __future__ import annotations

import time
import uuid

import pytest

from odapi_operators.core import storage
from odapi_operators.core.data.exports import find_complete_exports, list_exports, scan_exports
from odapi_operators.core.data.ledger import Ledger
from odapi_operators.core.storage import StorageError


@pytest.fixture()
def prefix(gcs_emulator) -> str:
    """A fresh gs:// "folder" per test."""
    return f"{gcs_emulator}/{uuid.uuid4().hex[:8]}"


def test_write_read_stat_roundtrip(prefix):
    path = f"{prefix}/deep/a.txt"
    storage.write_text(path, "héllo")
    assert storage.read_text(path) == "héllo"
    first = storage.stat(path)
    assert first.size == len("héllo".encode())
    assert abs(first.mtime - time.time()) < 60
    storage.write_text(path, "changed")
    second = storage.stat(path)
    assert second.size == 7 and second.generation != first.generation


def test_conditional_write_returns_generation(prefix):
    path = f"{prefix}/ledger.jsonl"
    generation = storage.write_bytes_if_generation(path, b"1\n", 0)
    assert generation == storage.stat(path).generation
    assert storage.read_bytes(path) == b"1\n"


def test_conditional_write_refuses_local_paths(tmp_path):
    with pytest.raises(StorageError, match="object store") as info:
        storage.write_bytes_if_generation(tmp_path / "x", b"1", 0)
    assert str(tmp_path / "x") in str(info.value)


def test_list_files_recursive_under_prefix_only(prefix):
    for name in ("b/2.txt", "1.txt", "b/c/3.txt"):
        storage.write_text(f"{prefix}/e/{name}", name)
    storage.write_text(f"{prefix}/e-sibling/x.txt", "not below e/")
    assert storage.list_files(f"{prefix}/e") == [
        f"{prefix}/e/1.txt", f"{prefix}/e/b/2.txt", f"{prefix}/e/b/c/3.txt"]
    assert storage.list_files(f"{prefix}/e/") == storage.list_files(f"{prefix}/e")
    assert storage.list_files(f"{prefix}/e/1.txt") == [f"{prefix}/e/1.txt"]
    assert storage.list_files(f"{prefix}/nothing") == []
    stats = storage.list_stats(f"{prefix}/e/b")
    assert [s.size for s in stats.values()] == [len("b/2.txt"), len("b/c/3.txt")]


def test_exists_for_objects_folders_and_buckets(prefix, gcs_emulator):
    storage.write_text(f"{prefix}/f/x.txt", "x")
    assert storage.exists(f"{prefix}/f/x.txt")
    assert storage.exists(f"{prefix}/f") and storage.exists(f"{prefix}/f/")
    assert not storage.exists(f"{prefix}/f/y.txt")
    assert not storage.exists(f"{prefix}/f/x")  # a name prefix is not a folder
    assert storage.exists(gcs_emulator)
    assert not storage.exists("gs://no-such-bucket")


def test_missing_objects_and_buckets_raise_errors_naming_the_path(prefix):
    with pytest.raises(FileNotFoundError, match=f"{prefix}/missing"):
        storage.read_bytes(f"{prefix}/missing")
    with pytest.raises(FileNotFoundError, match=f"{prefix}/missing"):
        storage.stat(f"{prefix}/missing")
    with pytest.raises(FileNotFoundError, match="gs://no-such-bucket/x"):
        storage.list_files("gs://no-such-bucket/x")
    with pytest.raises(StorageError, match="no bucket"):
        storage.read_bytes("gs:///x")


def _export(root: str, name: str, marker: str | None = None, files: int = 2) -> str:
    for i in range(files):
        storage.write_text(f"{root}/{name}/ann_{i}.xml", f"<annotation>{i}</annotation>")
    if marker:
        storage.write_text(f"{root}/{name}/{marker}", "")
    return f"{root}/{name}"


def test_marker_decides_completeness_of_sub_prefixes(prefix):
    done = _export(prefix, "batch-1", marker="_SUCCESS")
    _export(prefix, "batch-2")  # still uploading: no marker yet
    assert find_complete_exports(prefix, "_SUCCESS") == [done]
    [export] = list_exports(prefix, "_SUCCESS")
    assert export.landed_at == storage.stat(f"{done}/_SUCCESS").mtime
    # the watched prefix can itself be the export
    assert find_complete_exports(done, "_SUCCESS") == [done]
    assert find_complete_exports(f"{prefix}/batch-2", "_SUCCESS") == []


def test_inactivity_decides_without_marker(prefix):
    export = _export(prefix, "batch-1")
    t0 = time.time()
    found, snapshot = scan_exports(prefix, None, inactivity_seconds=5, now=t0)
    assert found == [] and set(snapshot) == {export}
    found, snapshot = scan_exports(prefix, None, 5, snapshot, now=t0 + 3)
    assert found == []
    storage.write_text(f"{export}/late.xml", "<annotation/>")  # still being written
    found, snapshot = scan_exports(prefix, None, 5, snapshot, now=t0 + 6)
    assert found == [] and snapshot[export]["since"] == t0 + 6
    found, _ = scan_exports(prefix, None, 5, snapshot, now=t0 + 11)
    assert [e.path for e in found] == [export]
    # zero inactivity keeps the old rule: complete as soon as it holds a file
    assert find_complete_exports(prefix, None) == [export]


def test_rewrite_with_same_size_restarts_inactivity(prefix):
    export = _export(prefix, "batch-1", files=1)
    t0 = time.time()
    _, snapshot = scan_exports(prefix, None, 5, now=t0)
    storage.write_text(f"{export}/ann_0.xml", "<annotation>9</annotation>")  # same size
    found, snapshot = scan_exports(prefix, None, 5, snapshot, now=t0 + 6)
    assert found == [] and snapshot[export]["since"] == t0 + 6


def test_ledger_on_gcs_claims_once(prefix):
    exports = list_exports(_export(prefix, "exports/a", marker="_SUCCESS").rsplit("/", 1)[0],
                           "_SUCCESS")
    ledger = Ledger(f"{prefix}/state/ledger.jsonl")
    assert ledger.claim("run-1", exports) == [exports[0].path]
    assert ledger.claim("run-2", exports) == []
    assert ledger.claim("run-1", []) == [exports[0].path]
    assert [r["run_id"] for r in ledger.records()] == ["run-1"]


def test_val_examples_of_a_records_folder_on_gcs(prefix):
    """A gs:// records folder: its summary, then its val shards in order (the export's
    warmup requests and the report read them so)."""
    import io
    import json

    from odapi_operators.core.data.tfrecord import write_record
    from odapi_operators.core.model import tfvision

    records = f"{prefix}/records/"
    for shard, examples in (("val-00000-of-00002", [b"a", b"b"]), ("val-00001-of-00002", [b"c"]),
                            ("train-00000-of-00001", [b"t"])):
        stream = io.BytesIO()
        for example in examples:
            write_record(stream, example)
        storage.write_bytes(f"{records}{shard}.tfrecord", stream.getvalue())
    storage.write_text(f"{records}summary.json", json.dumps({"splits": {"val": {
        "pattern": f"{records}val-*.tfrecord"}}, "label_map": f"{records}label_map.pbtxt"}))
    assert tfvision.read_data_summary(records)["label_map"].startswith("gs://")
    assert tfvision.val_examples(records) == [b"a", b"b", b"c"]
    assert tfvision.val_examples(records.rstrip("/"), 2) == [b"a", b"b"]
    with pytest.raises(FileNotFoundError, match="not a records folder"):
        tfvision.read_data_summary(f"{prefix}/elsewhere")
