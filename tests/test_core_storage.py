"""storage: atomic writes, atomic directories, backend selection, permissions."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from odapi_operators.core import storage
from odapi_operators.core.storage import StorageError


class Boom(Exception):
    pass


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".tmp-"))


def test_atomic_write_success_replaces_content(tmp_path):
    target = tmp_path / "sub" / "f.txt"
    with storage.atomic_write(target, "w") as fh:
        fh.write("new")
    assert target.read_text() == "new"
    assert _leftovers(target.parent) == []


def test_atomic_write_failure_keeps_old_file_and_no_temp(tmp_path):
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")
    with pytest.raises(Boom):
        with storage.atomic_write(target) as fh:
            fh.write(b"half of the new content")
            raise Boom
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]


def test_atomic_write_failure_on_new_path_creates_nothing(tmp_path):
    target = tmp_path / "new.bin"
    with pytest.raises(Boom):
        with storage.atomic_write(target) as fh:
            fh.write(b"x")
            raise Boom
    assert list(tmp_path.iterdir()) == []


def test_atomic_directory_replace_swaps_content(tmp_path):
    final = tmp_path / "out"
    with storage.atomic_directory(final) as tmp:
        (tmp / "a.txt").write_text("1")
        (tmp / "stale.txt").write_text("old")
    with storage.atomic_directory(final, replace=True) as tmp:
        assert tmp != final and not (tmp / "a.txt").exists()
        # readers still see the old version while the new one is being written
        assert (final / "stale.txt").read_text() == "old"
        (tmp / "a.txt").write_text("2")
    assert sorted(p.name for p in final.iterdir()) == ["a.txt"]
    assert (final / "a.txt").read_text() == "2"
    assert _leftovers(tmp_path) == []


def test_atomic_directory_no_replace_refuses_to_overwrite(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "keep.txt").write_text("keep")
    with pytest.raises(StorageError, match="already exists") as info:
        with storage.atomic_directory(final, replace=False) as tmp:
            (tmp / "keep.txt").write_text("clobbered")
    assert str(final) in str(info.value)
    assert (final / "keep.txt").read_text() == "keep"
    assert _leftovers(tmp_path) == []


def test_atomic_directory_failing_block_leaves_nothing(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with pytest.raises(Boom):
        with storage.atomic_directory(final) as tmp:
            (tmp / "partial.txt").write_text("partial")
            raise Boom
    assert sorted(p.name for p in final.iterdir()) == ["old.txt"]
    assert _leftovers(tmp_path) == []


def test_atomic_directory_failing_block_on_new_path(tmp_path):
    with pytest.raises(Boom):
        with storage.atomic_directory(tmp_path / "out"):
            raise Boom
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("call", [
    lambda p: storage.exists(p),
    lambda p: storage.read_bytes(p),
    lambda p: storage.read_text(p),
    lambda p: storage.write_bytes(p, b"x"),
    lambda p: storage.write_text(p, "x"),
    lambda p: storage.list_files(p),
], ids=["exists", "read_bytes", "read_text", "write_bytes", "write_text", "list_files"])
def test_unsupported_scheme_raises_storage_error_naming_path(call, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(StorageError) as info:
        call("s3://x")
    assert "s3://x" in str(info.value)
    assert "s3" in str(info.value) and "unsupported" in str(info.value)
    assert isinstance(info.value, OSError)  # callers catching OSError still see it
    assert list(tmp_path.iterdir()) == []  # nothing written locally


@pytest.mark.parametrize("opener", ["atomic_write", "atomic_directory"])
def test_atomic_helpers_refuse_unsupported_scheme(opener, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    try:
        with pytest.raises(StorageError, match="s3://x/out"):
            with getattr(storage, opener)("s3://x/out"):
                pass
    finally:
        assert list(tmp_path.iterdir()) == []  # no local 's3:' directory created


def test_local_backend_list_files_sorted_recursive(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "2.txt").write_text("")
    (tmp_path / "1.txt").write_text("")
    assert storage.list_files(tmp_path) == [str(tmp_path / "1.txt"), str(tmp_path / "b" / "2.txt")]
    assert storage.list_files(tmp_path / "1.txt") == [str(tmp_path / "1.txt")]


def test_write_then_read_roundtrip(tmp_path):
    storage.write_text(tmp_path / "deep" / "x.txt", "héllo")
    assert storage.exists(tmp_path / "deep" / "x.txt")
    assert storage.read_text(tmp_path / "deep" / "x.txt") == "héllo"


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def test_created_dirs_and_files_are_not_private(tmp_path, umask_022):
    final = tmp_path / "parent" / "out"
    with storage.atomic_directory(final) as tmp:
        storage.write_text(tmp / "f.txt", "x")
        (tmp / "sub").mkdir()
    assert stat.S_IMODE(final.stat().st_mode) == 0o755
    assert stat.S_IMODE(final.parent.stat().st_mode) == 0o755
    assert stat.S_IMODE((final / "f.txt").stat().st_mode) == 0o644
    storage.write_text(tmp_path / "w" / "g.txt", "y")
    assert stat.S_IMODE((tmp_path / "w").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "w" / "g.txt").stat().st_mode) == 0o644


def test_replaced_dir_keeps_readable_mode(tmp_path, umask_022):
    final = tmp_path / "out"
    for _ in range(2):
        with storage.atomic_directory(final) as tmp:
            (tmp / "f").write_text("x")
    assert stat.S_IMODE(final.stat().st_mode) != 0o700
    assert stat.S_IMODE(final.stat().st_mode) & 0o055 == 0o055


_WRITER = """import sys, time
from odapi_operators.core import storage
with storage.atomic_write(sys.argv[1]) as fh, storage.atomic_directory(sys.argv[2]):
    fh.write(b"half")
    fh.flush()
    print("writing", flush=True)
    time.sleep(60)
"""


def _writer_mid_write(tmp_path) -> subprocess.Popen:
    """A real process stopped inside an atomic file write and an atomic folder write."""
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path / "out" / "a.json"),
                             str(tmp_path / "out" / "deep" / "folder")],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "writing\n"
    return proc


def test_sweep_removes_a_killed_writers_temporaries_and_keeps_a_live_ones(tmp_path):
    killed, live = _writer_mid_write(tmp_path), _writer_mid_write(tmp_path)
    try:
        killed.kill()
        killed.wait()
        leftovers = sorted(p.name for p in (tmp_path / "out").rglob(".tmp-*"))
        assert len(leftovers) == 4, leftovers  # a file and a folder from each writer

        assert storage.sweep_temporaries(tmp_path / "out") == 2
        kept = sorted(p.name for p in (tmp_path / "out").rglob(".tmp-*"))
        assert len(kept) == 2 and all(f"-{live.pid}-" in name for name in kept), kept
    finally:
        live.kill()
        live.wait()
    assert storage.sweep_temporaries(tmp_path / "out") == 2
    assert not list((tmp_path / "out").rglob(".tmp-*"))
    assert not (tmp_path / "out" / "a.json").exists()  # nothing half-written under its name


def test_a_stage_rerun_removes_its_killed_attempts_temporaries(tmp_path):
    from odapi_operators.core.stages.runner import run_stage

    killed = _writer_mid_write(tmp_path)
    killed.kill()
    killed.wait()
    lines: list[str] = []
    run_stage("label_map", inputs={"manifest": str(_tiny_manifest(tmp_path))},
              out=tmp_path / "out", log=lines.append)
    assert not list((tmp_path / "out").rglob(".tmp-*"))
    assert any("removed 2 temporaries" in line for line in lines), lines


def _tiny_manifest(tmp_path) -> Path:
    from odapi_operators.core.data.ingest import ingest
    from odapi_operators.core.data.sample_data import generate

    generate(tmp_path / "export", count=2, seed=1, max_side=64)
    ingest([str(tmp_path / "export")], tmp_path / "ingest")
    return tmp_path / "ingest" / "manifest.jsonl"


def test_val_examples_stream_their_shards_in_order_and_name_a_broken_one(tmp_path):
    """The val split read without TensorFlow: shards in name order, train shards left out,
    the first `count` without reading further, and a broken file named in the error."""
    from odapi_operators.core.data.tfrecord import write_record
    from odapi_operators.core.model.tfvision import val_examples

    records = [f"example {i}".encode() for i in range(5)]
    for shard, part in (("val-00001-of-00002.tfrecord", records[3:]),
                        ("val-00000-of-00002.tfrecord", records[:3]),
                        ("train-00000-of-00001.tfrecord", [b"train"])):
        with open(tmp_path / shard, "wb") as stream:
            for record in part:
                write_record(stream, record)
    (tmp_path / "summary.json").write_text(json.dumps(
        {"splits": {"val": {"pattern": f"{tmp_path}/val-*.tfrecord"}}}))
    assert val_examples(tmp_path) == records
    assert val_examples(tmp_path, 2) == records[:2]
    (tmp_path / "val-00001-of-00002.tfrecord").write_bytes(b"not a TFRecord file")
    assert val_examples(tmp_path, 3) == records[:3]  # stops before the broken shard
    with pytest.raises(ValueError, match=r"val-00001-of-00002\.tfrecord: corrupt TFRecord"):
        val_examples(tmp_path)
