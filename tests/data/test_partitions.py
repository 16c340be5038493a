"""Images as partitions (core/data/partitions.py), run stage by stage as the mapped tasks run
them: stable placement by key, records that do not depend on who prepared which partition or
in what order, the run's budgets over all partitions, and a partition killed mid-way (SIGKILL)
that re-runs alone."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from odapi_operators.core.data.partitions import (
    join_partitions,
    partition_count,
    partition_of,
    plan_partitions,
)
from odapi_operators.core.data.sample_data import generate
from odapi_operators.core.data.split import split_of
from odapi_operators.core.data.tfrecord import read_records
from odapi_operators.core.rejections import StageError

from support.partitions import run_partitioned, shards, stage
from support.processes import gone, in_session, kill_session, wait_until_signalled

IMAGES, SEED = 32, 5
ATTEMPT_KEYS = {"skipped", "fetched", "copied", "downloaded", "bytes", "seconds",
                "images_per_s", "reused", "requests", "duplicates",
                "outputs_of"}  # what one attempt did (outputs_of: its index file's identity)


def _pipeline(home: Path, export: Path, **images: object) -> Path:
    path = home / "pipeline.yaml"
    home.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "home": str(home), "exports": {"path": str(export)},
        "images": {"max_side": 64, **images},
        "train": {"model_config": "m.yaml", "steps": 1},
        "serving": {"base": "serving", "model_name": "shapes"}}))
    return path


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("export")
    generate(folder, count=IMAGES, seed=SEED, max_side=96)
    return folder


def _examples(records: Path) -> Counter:
    found: Counter = Counter()
    for path in records.glob("*.tfrecord"):
        with open(path, "rb") as fh:
            found.update(data for _, data in read_records(fh))
    return found


def test_a_partition_is_a_hash_of_the_key_apart_from_the_split():
    keys = [f"img{i:05d}" for i in range(2000)]
    assert [partition_of(k, 8) for k in keys] == [partition_of(k, 8) for k in keys]
    sizes = Counter(partition_of(k, 8) for k in keys)
    assert set(sizes) == set(range(8)) and max(sizes.values()) < 2 * min(sizes.values())
    # other bits than the split's: every partition holds both splits in their ratio
    for index in range(8):
        splits = Counter(split_of(k, {"train": 0.5, "val": 0.5}) for k in keys
                         if partition_of(k, 8) == index)
        assert 0.35 < splits["train"] / sum(splits.values()) < 0.65, (index, splits)
    assert partition_count(100, 4, None) == 4
    assert partition_count(100, None, 30) == 4  # ceil(100 / 30)
    assert partition_count(3, 8, None) == 3  # never an empty task by construction
    assert partition_count(0, 8, None) == 1
    assert partition_count(10**7, None, 10) == 1024  # Airflow's max_map_length


def test_the_plan_is_kept_for_the_same_manifest_and_count(tmp_path, export):
    pipeline = _pipeline(tmp_path, export)
    manifest = stage(pipeline, "ingest", exports=[str(export)]).manifest
    plan = plan_partitions(manifest, tmp_path / "parts", partitions=4)
    assert sum(p["images"] for p in plan["partitions"]) == IMAGES
    first = tmp_path / "parts" / "part-00000-of-00004" / "manifest.jsonl"
    before = first.stat().st_mtime_ns
    assert plan_partitions(manifest, tmp_path / "parts", partitions=4) == plan
    assert first.stat().st_mtime_ns == before  # a re-run rewrites nothing tasks may read
    positions = sorted(json.loads(line)["provenance"]["position"]
                       for part in plan["partitions"]
                       for line in Path(part["folder"], "manifest.jsonl").read_text().split("\n")
                       if line)
    assert positions == list(range(1, IMAGES + 1))
    assert plan_partitions(manifest, tmp_path / "parts", partitions=3)["count"] == 3


def test_records_do_not_depend_on_the_order_and_hold_what_one_task_writes(tmp_path, export):
    forward = run_partitioned(_pipeline(tmp_path / "a", export, partitions=4), export)
    backward = run_partitioned(_pipeline(tmp_path / "b", export, partitions=4), export,
                               reverse=True)
    records = forward / "records"
    assert sorted(shards(records)) == [f"{s}-0000{i}-of-00004.tfrecord"
                                        for s in ("train", "val") for i in range(4)]
    assert shards(records) == shards(backward / "records")
    assert (records / "source_ids.json").read_bytes() == (
        backward / "records" / "source_ids.json").read_bytes()
    for split in ("train", "val"):  # the same but for the folder they are in
        a, b = (json.loads((folder / "records" / f"{split}.stats.json").read_text())
                for folder in (forward, backward))
        assert {**a, "pattern": None} == {**b, "pattern": None}
    summary = json.loads((records / "summary.json").read_text())
    assert summary["partitions"] == 4
    assert sum(s["images"] for s in summary["splits"].values()) == IMAGES
    assert not [p for p in forward.rglob(".tmp-*")]

    # the single-task path over the same export: other files, the same Examples (records
    # carry their manifest position as source id, whichever partition writes them)
    single = _pipeline(tmp_path / "c", export)
    manifest = stage(single, "ingest", exports=[str(export)]).manifest
    fetched = stage(single, "fetch", manifest=manifest).manifest
    verified = stage(single, "verify", manifest=fetched).manifest
    label_map = stage(single, "label_map", manifest=verified).label_map
    one = Path(stage(single, "shard", manifest=verified, label_map=label_map).data)
    assert Path(label_map).read_bytes() == (forward / "label_map" / "label_map.pbtxt").read_bytes()
    assert _examples(records) == _examples(one) and sum(_examples(one).values()) == IMAGES
    assert json.loads((records / "source_ids.json").read_text()) == json.loads(
        (one / "source_ids.json").read_text())

    # a shard task retried after it finished writes nothing again
    part = json.loads((forward / "partitions" / "plan.json").read_text())["partitions"][0]
    shard = records / "train-00000-of-00004.tfrecord"
    before = shard.stat().st_mtime_ns
    stage(forward.parents[2] / "pipeline.yaml", "shard_partition", partition=part,
           label_map=str(forward / "label_map" / "label_map.pbtxt"))
    assert shard.stat().st_mtime_ns == before


def test_budgets_are_the_runs_not_a_partitions(tmp_path, export):
    """One image missing and one truncated: 1 of 32 each is within the 5% budgets, though
    the partitions that hold them lose more than 5% of theirs."""
    local = tmp_path / "export"
    generate(local, count=IMAGES, seed=SEED, max_side=96)
    pipeline = _pipeline(tmp_path, local, partitions=3, cache=None)
    manifest = stage(pipeline, "ingest", exports=[str(local)]).manifest
    parts = [p.model_dump() for p in stage(pipeline, "plan_partitions",
                                           manifest=manifest).partitions]
    images = sorted(local.glob("*.jpg"))
    images[3].unlink()
    data = images[7].read_bytes()
    images[7].write_bytes(data[: len(data) // 2])
    for part in parts:
        stage(pipeline, "prepare_partition", partition=part)
    partition_sizes = {p["index"]: p["images"] for p in parts}
    for image in (images[3], images[7]):
        key = image.stem
        assert 1 / partition_sizes[partition_of(key, 3)] > 0.05, key
    joined = stage(pipeline, "join_partitions", partitions=parts)
    assert (joined.ok, joined.failed, joined.fetch_failed) == (IMAGES - 2, 1, 1)
    failures = [json.loads(line) for line in Path(joined.failures).read_text().splitlines()]
    assert [(f["record"], f["reason"].split(":")[0]) for f in failures] == [
        (images[3].stem, "not found")]
    [quarantined] = Path(joined.quarantine).read_text().splitlines()
    assert json.loads(quarantined)["record"] == images[7].stem
    with pytest.raises(StageError, match=r"fetch: 1 of 32 images failed .* images.max_failed_"
                                         r"share = 0.01 .*failures.jsonl"):
        join_partitions(parts, tmp_path / "strict", max_failed_share=0.01)
    with pytest.raises(StageError, match=r"verify: 1 of 31 images quarantined .*quarantine"):
        join_partitions(parts, tmp_path / "strict", max_quarantined_share=0.01)
    (Path(parts[1]["folder"]) / "verify" / "summary.json").unlink()
    with pytest.raises(StageError, match="partition part-00001-of-00003 is not prepared"):
        join_partitions(parts, tmp_path / "strict")


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def _stamps(folders: list[Path]) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for folder in folders
            for p in folder.rglob("*") if p.is_file()}


def _same(name: str, data: bytes, clean: bytes | None) -> bool:
    """What a clean attempt wrote there; a journal of whole lines; a summary up to what one
    attempt did."""
    if name.endswith("-index.jsonl"):
        try:
            return all(json.loads(line) for line in data.decode().split("\n")[:-1])
        except ValueError:
            return False
    if clean is None:
        return False
    if name.endswith("summary.json"):
        def kept(raw: bytes) -> dict:
            return {k: v for k, v in json.loads(raw).items() if k not in ATTEMPT_KEYS}
        return kept(data) == kept(clean)
    return data == clean


def test_a_partition_killed_mid_way_reruns_alone_and_leaves_nothing_partial(tmp_path, export):
    pipeline = _pipeline(tmp_path, export, partitions=4, cache=None)
    run = run_partitioned(pipeline, export)
    parts = json.loads((run / "partitions" / "plan.json").read_text())["partitions"]
    target = max(parts, key=lambda p: p["images"])
    folder, records = Path(target["folder"]), run / "records"
    clean, clean_records = _files(folder), shards(records)
    # as if the partition had never been prepared: its images, verify output and shards go
    for name in ("images", "verify"):
        subprocess.run(["rm", "-r", str(folder / name)], check=True)
    mine = [p for p in records.rglob(f"*-{target['index']:05d}-of-00004.tfrecord*")]
    assert len(mine) == 6  # two shards, their stats files and lists of Examples
    for path in mine:
        path.unlink()
    others = [Path(p["folder"]) for p in parts if p is not target]
    untouched = _stamps(others) | {k: v for k, v in _stamps([records]).items()
                                   if f"-{target['index']:05d}-of-" not in k
                                   and "tfrecord" in k}

    command = [sys.executable, "-m", "odapi_operators", "stage", "run", "prepare_partition",
               "--pipeline", str(pipeline), "--run-id", "r1", "--input", "partition",
               json.dumps(target)]
    signal_file = tmp_path / "paused"
    env = {**os.environ, "ODAPI_PAUSE_AT": "prepare:verifying",
           "ODAPI_PAUSE_SIGNAL": str(signal_file)}
    proc = subprocess.Popen(command, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_until_signalled(proc, signal_file, "the partition's verify")
        os.killpg(proc.pid, signal.SIGKILL)  # the worker is lost: all of its processes
        proc.wait()
        assert gone(in_session(proc.pid)) == []
    finally:
        kill_session(proc.pid)
    at_kill = _files(folder)
    assert "verify/manifest.jsonl" not in at_kill  # killed mid-way, not after
    assert "verify/verify-index.jsonl" in at_kill
    partial = [name for name, data in at_kill.items()
               if not any(part.startswith(".tmp-") for part in Path(name).parts)
               and not _same(name, data, clean.get(name))]
    assert partial == []

    rerun = subprocess.run([*command], capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    after = _files(folder)
    assert not [name for name in after if ".tmp-" in name]
    assert [n for n, data in after.items() if not _same(n, data, clean.get(n))] == []
    assert set(after) == set(clean)
    stage(pipeline, "shard_partition", partition=target,
           label_map=str(run / "label_map" / "label_map.pbtxt"))
    assert shards(records) == clean_records
    assert {k: v for k, v in (_stamps(others) | _stamps([records])).items()
            if k in untouched} == untouched
