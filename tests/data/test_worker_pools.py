"""Worker pools of the verify and shard stages die with the process that owns them: a stage
killed with SIGKILL (a lost worker, an OOM kill) leaves no worker writing into its output
folder while the re-run runs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from odapi_operators.core.data.label_map import format_label_map
from odapi_operators.core.data.manifest import Box, ImageRecord, ImageSource, write_manifest


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


def _children(pid: int) -> set[int]:
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found.update(int(p) for p in (task / "children").read_text().split())
        except OSError:
            pass
    return found


def _wait_for(check, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while not (found := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)
    return found


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in folder.rglob("*") if p.is_file()}


def _odapi(*args: str) -> list[str]:
    return [sys.executable, "-m", "odapi_operators", *args, "--no-progress"]


def _rerun(command: list[str]) -> None:
    done = subprocess.run(_odapi(*command), capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]


def _kill_mid_way(command: list[str], out: Path, started) -> None:
    """Start `odapi COMMAND`; once its 2 workers run and `started(out)`, SIGKILL it (only it,
    as the kernel's OOM killer would); then no worker may live, nor the folder change."""
    stage = subprocess.Popen(_odapi(*command), stdout=subprocess.DEVNULL)
    try:
        workers = _wait_for(lambda: len(_children(stage.pid)) >= 2 and _children(stage.pid),
                            60, "the worker pool")
        _wait_for(lambda: started(out), 60, "the first output")
    finally:
        stage.send_signal(signal.SIGKILL)
        stage.wait()
    assert stage.returncode == -signal.SIGKILL, "the stage finished before it was killed"
    try:
        _wait_for(lambda: not any(_alive(w) for w in workers), 5, "the workers to die")
    finally:
        for worker in workers:  # on failure, end the orphans: they would write on for long
            if _alive(worker):
                os.kill(worker, signal.SIGKILL)
    before = _snapshot(out)
    time.sleep(1.0)
    assert _snapshot(out) == before, "the output folder changed after the stage was killed"


def _png_dataset(root: Path, count: int) -> Path:
    """`count` records of a 1000x1000 noise PNG (slow to decode: seconds for the lot)."""
    image = root / "noise.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (1000, 1000, 3), dtype=np.uint8)).save(image)
    records = []
    for i in range(count):
        path = root / "img" / f"{i:04d}.png"
        path.parent.mkdir(exist_ok=True)
        os.link(image, path)
        records.append(ImageRecord(f"img{i:04d}", ImageSource("local", str(path)), path.name,
                                   1000, 1000, (Box("cat", 0.1, 0.1, 0.5, 0.5),)))
    write_manifest(root / "m.jsonl", records)
    return root / "m.jsonl"


def _many_records(root: Path, count: int) -> tuple[Path, Path]:
    """`count` records of one tiny JPEG: seconds of Example encoding for two writers."""
    image = root / "tiny.jpg"
    Image.new("RGB", (16, 16), (200, 30, 30)).save(image)
    records = [ImageRecord(f"img{i:05d}", ImageSource("local", str(image)), f"{i}.jpg", 16, 16,
                           (Box("cat", 0.1, 0.1, 0.5, 0.5),)) for i in range(count)]
    write_manifest(root / "m.jsonl", records)
    (root / "label_map.pbtxt").write_text(format_label_map({"cat": 1}))
    return root / "m.jsonl", root / "label_map.pbtxt"


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux's")
def test_killed_verify_leaves_no_worker_and_reruns(tmp_path):
    manifest = _png_dataset(tmp_path, 60)
    out = tmp_path / "verify"
    command = ["verify", "--manifest", str(manifest), "--out", str(out), "--workers", "2",
               "--max-side", "64"]
    _kill_mid_way(command, out, lambda out: any((out / "files").glob("*.jpg")))
    _rerun(command)
    assert len((out / "manifest.jsonl").read_text().splitlines()) == 60


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux's")
def test_killed_shard_leaves_no_worker_and_reruns(tmp_path):
    manifest, label_map = _many_records(tmp_path, 6000)
    out = tmp_path / "records"
    command = ["shard", "--manifest", str(manifest), "--label-map", str(label_map), "--out",
               str(out), "--workers", "2", "--split", "train=0.75,val=0.25", "--shards",
               "train=4,val=2"]
    _kill_mid_way(command, out, lambda out: any(out.glob(".tmp-*")))
    assert not list(out.glob("*.tfrecord")), "the shards were complete before the kill"
    _rerun(command)
    assert sorted(p.name for p in out.glob("*.tfrecord")) == \
        [f"train-0000{i}-of-00004.tfrecord" for i in range(4)] + \
        [f"val-0000{i}-of-00002.tfrecord" for i in range(2)]
    assert not list(out.glob(".tmp-*"))
