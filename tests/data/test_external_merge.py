"""Ingest's external merge by key: the same version, byte for byte, whether every sort stays in
memory or spills sorted runs to disk (forced with tiny run sizes), on randomized exports
(unsorted Open Images CSVs, duplicates, snapshots, deleted files, a backfilled export)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
from pathlib import Path

import pytest

from odapi_operators.core import external_sort
from odapi_operators.core.data import ingest as ingest_module
from odapi_operators.core.data import versions
from odapi_operators.core.data.ingest import ingest
from odapi_operators.core.data.manifest import (
    Box,
    ImageRecord,
    ImageSource,
    Manifest,
    write_manifest,
)
from odapi_operators.core.external_sort import ExternalSorter, Spool
from odapi_operators.core.rejections import StageError

MIDS = {f"/m/0t{i:03d}": f"Thing{i}" for i in range(6)}
BOX_HEADER = ("ImageID,Source,LabelName,Confidence,XMin,XMax,YMin,YMax,IsOccluded,IsTruncated,"
              "IsGroupOf,IsDepiction,IsInside")
INDEX_HEADER = "ImageID,Subset,OriginalURL,OriginalMD5,Rotation"
DAY = 86_400
PATH_KEYS = ("manifest", "label_map", "rejections", "diff", "version")


def box_rows(rng: random.Random, image_id: str, count: int) -> list[str]:
    rows = []
    for _ in range(count):
        x0, y0 = rng.randrange(0, 60) / 100, rng.randrange(0, 60) / 100
        group = int(rng.random() < 0.1)
        rows.append(f"{image_id},xclick,{rng.choice(list(MIDS))},1,{x0},{x0 + 0.3},{y0},"
                    f"{y0 + 0.3},0,0,{group},0,0\n")
    return rows


def oi_export(folder: Path, landed: float, rng: random.Random, ids: list[str],
              deleted: list[str] | None = None) -> Path:
    """An Open Images export of `ids` (URL sources, unsorted rows and index); a few images
    given again in a second boxes CSV, with the same or other boxes (duplicates)."""
    folder.mkdir(parents=True)
    (folder / "class-descriptions-boxable.csv").write_text(
        "".join(f"{mid},{name}\n" for mid, name in MIDS.items()))
    rows = [row for image_id in ids for row in box_rows(rng, image_id, rng.randint(1, 4))]
    rng.shuffle(rows)
    (folder / "train-annotations-bbox.csv").write_text(BOX_HEADER + "\n" + "".join(rows))
    again = rng.sample(ids, min(2, len(ids)))
    (folder / "validation-annotations-bbox.csv").write_text(BOX_HEADER + "\n" + "".join(
        row for image_id in again for row in box_rows(rng, image_id, 1)))
    index = [f"{i},train,http://127.0.0.1:1/{i}.jpg,"
             f"{base64.b64encode(hashlib.md5(i.encode()).digest()).decode()},"
             f"{rng.choice(('0', '90', ''))}\n" for i in ids]
    rng.shuffle(index)
    (folder / "train-images-boxable-with-rotation.csv").write_text(
        INDEX_HEADER + "\n" + "".join(index))
    if deleted is not None:
        (folder / "deleted.txt").write_text("".join(f"{name}\n" for name in deleted))
    (folder / "_SUCCESS").write_text("")
    os.utime(folder / "_SUCCESS", (landed, landed))
    return folder


def scenario(root: Path, seed: int) -> list[tuple[list[Path], dict]]:
    """Two runs of exports: two incremental ones; then a backfilled one (landed before the
    first run's newest), a snapshot and an incremental one with a deleted file."""
    rng = random.Random(seed)
    ids = [f"{rng.getrandbits(48):012x}" for _ in range(40)]
    day = 1_767_600_000
    first = [oi_export(root / "e1", day, rng, ids[:20]),
             oi_export(root / "e2", day + DAY, rng, rng.sample(ids[10:30], 12))]
    held = set(ids[:30])
    snapshot_ids = rng.sample(sorted(held), 18) + ids[30:34]
    gone = sorted(held - set(snapshot_ids))
    later_ids = ids[34:]
    deleted = rng.sample([i for i in snapshot_ids if i not in later_ids], 3)
    second = [oi_export(root / "backfill", day + DAY // 2, rng, rng.sample(ids[:30], 5)),
              oi_export(root / "snapshot", day + 3 * DAY, rng, snapshot_ids),
              oi_export(root / "e5", day + 4 * DAY, rng, later_ids, deleted=deleted)]
    assert gone  # the snapshot removes images
    return [(first, {}), (second, {"modes": {"*snapshot": "snapshot"}})]


def outputs(summary: dict) -> dict:
    folder = Path(summary["manifest"]).parent
    files = {name: (folder / name).read_bytes()
             for name in ("manifest.jsonl", "diff.json", "rejections.jsonl", "label_map.pbtxt")}
    return {**files, "summary": {k: v for k, v in summary.items() if k not in PATH_KEYS}}


def ingest_runs(root: Path, store: Path, runs: list[tuple[list[Path], dict]]) -> list[dict]:
    results = []
    for number, (exports, options) in enumerate(runs):
        summary = ingest([str(e) for e in exports], store.parent / f"{store.name}-run{number}",
                         datasets_dir=str(store), run_id=f"run{number}", marker="_SUCCESS",
                         **options)
        results.append(outputs(summary))
    return results


class _CountedRun(external_sort._Run):
    created = 0

    def __init__(self, *args, **kwargs):
        type(self).created += 1
        super().__init__(*args, **kwargs)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_spilled_runs_give_the_in_memory_version_byte_for_byte(tmp_path, monkeypatch, seed):
    runs = scenario(tmp_path / "exports", seed)
    monkeypatch.setattr(external_sort, "_Run", _CountedRun)
    _CountedRun.created = 0
    in_memory = ingest_runs(tmp_path, tmp_path / "memory", runs)
    assert _CountedRun.created == 0  # small input: nothing touched the disk

    monkeypatch.setattr(external_sort, "MAX_BYTES", 1000)
    monkeypatch.setattr(ingest_module.Fingerprint, "SPOOL_BYTES", 100)
    on_disk = ingest_runs(tmp_path, tmp_path / "disk", runs)
    assert _CountedRun.created > 20  # rows, index, records, deltas and diff keys spilled

    for memory, disk in zip(in_memory, on_disk):
        assert disk == memory
    last = in_memory[-1]["summary"]
    assert last["removed"] and last["added"] and last["superseded"]
    assert {"duplicate record", "conflicting duplicate"} & set(last["rejections_by_reason"])


def test_external_sorter_is_stable_across_runs_and_rereadable():
    rng = random.Random(0)
    items = [(rng.randrange(50), i) for i in range(5000)]
    sorter = ExternalSorter(key=lambda item: item[0], max_bytes=97 * 64).extend(items)
    assert sorter.on_disk and len(sorter) == 5000
    assert list(sorter) == sorted(items, key=lambda item: item[0]) == list(sorter)
    spool = Spool(max_bytes=10 * 64)
    for item in items:
        spool.append(item)
    first, second = iter(spool), iter(spool)
    assert spool.on_disk and next(first) == next(second) == items[0]
    assert list(first) == items[1:] and list(spool) == items
    sorter.close()
    spool.close()


@pytest.mark.parametrize("max_bytes", [100, 10_000])
def test_diff_json_is_json_dumps_bytes(tmp_path, monkeypatch, max_bytes):
    monkeypatch.setattr(external_sort, "MAX_BYTES", max_bytes)

    def record(key: str, label: str) -> ImageRecord:
        return ImageRecord(key, ImageSource("url", f"http://x/{key}.jpg"), key, None, None,
                           (Box(label, 0.1, 0.1, 0.5, 0.5),))

    before = [record(k, "cat") for k in ("a", "b", "c", "d\u00e9")]
    after = [record("b", "dog"), record("c", "cat"), record("e", "cat"), record("f", "emu")]
    changes = versions.Diff()
    for _, (old, new) in versions.by_key(before, after):
        changes.add(old, new)
    head = {"parent": None, "exports": [{"path": "/x \"y\"", "mode": "snapshot"}]}
    changes.write(tmp_path / "diff.json", head)
    expected = {**head, "added": ["e", "f"], "changed": ["b"], "removed": ["a", "d\u00e9"],
                "classes_before": {"cat": 4}, "classes_after": {"cat": 2, "dog": 1, "emu": 1}}
    assert (tmp_path / "diff.json").read_text() == json.dumps(expected, indent=2)
    empty = versions.Diff()
    empty.write(tmp_path / "empty.json", {"parent": "p"})
    assert (tmp_path / "empty.json").read_text() == json.dumps(
        {"parent": "p", "added": [], "changed": [], "removed": [], "classes_before": {},
         "classes_after": {}}, indent=2)


def test_a_parent_manifest_out_of_key_order_is_refused_by_name(tmp_path):
    records = [ImageRecord(k, ImageSource("url", f"http://x/{k}.jpg"), k, None, None,
                           (Box("cat", 0.1, 0.1, 0.5, 0.5),)) for k in ("b", "a")]
    write_manifest(tmp_path / "manifest.jsonl", records)
    applied = versions.apply_exports(Manifest(tmp_path / "manifest.jsonl"), [],
                                     base_name="version x",
                                     parent_name=str(tmp_path / "manifest.jsonl"))
    with pytest.raises(StageError, match=r"manifest.jsonl: image key 'a' after 'b'"):
        list(applied.changes())
