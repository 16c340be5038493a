"""Dataset versions that accumulate: parent + exports in landing order, modes, deleted files,
backfill, re-runs, and the bad inputs that must leave the current version intact."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from odapi_operators.core.data import datasets
from odapi_operators.core.data.ingest import ingest
from odapi_operators.core.data.manifest import read_manifest
from odapi_operators.core.failures import Failure
from odapi_operators.core.rejections import StageError

from support.fakes import voc_export

DIFF_KEYS = ["parent", "exports", "added", "changed", "removed", "classes_before",
             "classes_after"]
# landing times (the _SUCCESS marker's mtime) of the exports below, in seconds
MONDAY, TUESDAY, WEDNESDAY, THURSDAY = 1_767_600_000, 1_767_686_400, 1_767_772_800, 1_767_859_200


CAT = ("cat", 10, 10, 60, 50)
DOG = ("dog", 30, 20, 110, 80)
BIRD = ("bird", 5, 5, 25, 25)


@pytest.fixture()
def store(tmp_path: Path) -> Path:
    return tmp_path / "datasets"


def run(exports: list[Path], store: Path, run_id: str, **kwargs) -> dict:
    """One run's ingest, as the stage calls it (marker _SUCCESS, the datasets folder)."""
    out = store.parent / "runs" / run_id / "ingest"
    return ingest([str(e) for e in exports], out, datasets_dir=str(store), run_id=run_id,
                  marker="_SUCCESS", **kwargs)


def boxes_of(summary: dict) -> dict[str, list[str]]:
    return {r.key: [b.label for b in r.boxes] for r in read_manifest(summary["manifest"])}


def diff_of(summary: dict) -> dict:
    return json.loads(Path(summary["diff"]).read_text())


@pytest.fixture()
def first(tmp_path: Path, store: Path) -> dict:
    """Monday's export: three photos, published as the first version."""
    monday = voc_export(tmp_path / "exports" / "2026-01-05", MONDAY,
                        {"a.jpg": [CAT], "b.jpg": [DOG], "c.jpg": [CAT, DOG]})
    return run([monday], store, "scheduled__monday")


def test_two_incremental_exports_make_the_union(tmp_path, store, first):
    tuesday = voc_export(tmp_path / "exports" / "2026-01-06", TUESDAY,
                         {"d.jpg": [BIRD], "e.jpg": [CAT]})
    second = run([tuesday], store, "scheduled__tuesday")
    assert first["parent"] is None and first["added"] == 3
    assert second["parent"] == first["fingerprint"]
    assert sorted(boxes_of(second)) == ["a", "b", "c", "d", "e"]
    assert (second["images"], second["added"], second["changed"], second["removed"]) == (5, 2, 0, 0)

    diff = diff_of(second)
    assert list(diff) == DIFF_KEYS
    assert diff["parent"] == first["fingerprint"]
    assert diff["exports"] == [{"path": str(tuesday), "fingerprint": diff["exports"][0][
        "fingerprint"], "landed_at": "2026-01-06T08:00:00.000000+00:00", "mode": "incremental"}]
    assert (diff["added"], diff["changed"], diff["removed"]) == (["d", "e"], [], [])
    assert diff["classes_before"] == {"cat": 2, "dog": 2}
    assert diff["classes_after"] == {"bird": 1, "cat": 3, "dog": 2}

    version = Path(second["version"])
    assert version == store / second["fingerprint"]
    assert json.loads((version / "diff.json").read_text()) == diff
    assert len(list(read_manifest(version / "manifest.jsonl"))) == 5
    lines = datasets.list_versions(store)
    assert [(v["fingerprint"], v["parent"], v["run_id"]) for v in lines] == [
        (first["fingerprint"], None, "scheduled__monday"),
        (second["fingerprint"], first["fingerprint"], "scheduled__tuesday")]
    assert (lines[1]["added"], lines[1]["changed"], lines[1]["removed"]) == (2, 0, 0)
    assert lines[1]["exports"] == diff["exports"]
    assert datasets.current_version(store) == second["fingerprint"]


def test_relabelled_image_takes_the_latest_labels_and_counts_as_changed(tmp_path, store, first):
    tuesday = voc_export(tmp_path / "exports" / "2026-01-06", TUESDAY,
                         {"a.jpg": [DOG, BIRD], "f.jpg": [CAT]})
    second = run([tuesday], store, "scheduled__tuesday")
    assert boxes_of(second)["a"] == ["dog", "bird"]
    assert diff_of(second)["changed"] == ["a"] and diff_of(second)["added"] == ["f"]
    assert second["rejected"] == 0  # a later export re-labelling is not a conflict


def test_exports_of_one_run_apply_in_landing_order(tmp_path, store, first):
    """Given in any order, the export that landed last gives the labels."""
    wednesday = voc_export(tmp_path / "exports" / "late", WEDNESDAY, {"a.jpg": [BIRD]})
    tuesday = voc_export(tmp_path / "exports" / "early", TUESDAY, {"a.jpg": [DOG]})
    second = run([wednesday, tuesday], store, "scheduled__wednesday")
    assert boxes_of(second)["a"] == ["bird"]
    assert [e["path"] for e in diff_of(second)["exports"]] == [str(tuesday), str(wednesday)]


def test_deleted_file_removes_images_by_name_or_key(tmp_path, store, first):
    tuesday = voc_export(tmp_path / "exports" / "2026-01-06", TUESDAY, {"g.jpg": [BIRD]},
                         deleted=["# blurry, removed by the reviewer", "b.jpg", "", "c"])
    second = run([tuesday], store, "scheduled__tuesday")
    assert sorted(boxes_of(second)) == ["a", "g"]
    assert (diff_of(second)["removed"], second["removed"]) == (["b", "c"], 2)
    assert not any("deleted.txt" in f for f in second["ignored_files"])  # read, not ignored


def test_an_export_of_only_a_deleted_file_is_an_export(tmp_path, store, first):
    tuesday = voc_export(tmp_path / "exports" / "2026-01-06", TUESDAY, {}, deleted=["a.jpg"])
    assert sorted(boxes_of(run([tuesday], store, "scheduled__tuesday"))) == ["b", "c"]


def test_snapshot_export_drops_the_images_it_lacks(tmp_path, store, first):
    snapshot = voc_export(tmp_path / "exports" / "labelstudio-2026-01-06", TUESDAY,
                          {"a.jpg": [CAT], "c.jpg": [CAT], "h.jpg": [DOG]})
    second = run([snapshot], store, "scheduled__tuesday",
                 modes={"*/labelstudio-*": "snapshot"})
    diff = diff_of(second)
    assert diff["exports"][0]["mode"] == "snapshot"
    assert (diff["added"], diff["changed"], diff["removed"]) == (["h"], ["c"], ["b"])
    assert sorted(boxes_of(second)) == ["a", "c", "h"]


def test_backfilled_late_export_merges_under_newer_labels(tmp_path, store, first):
    wednesday = voc_export(tmp_path / "exports" / "2026-01-07", WEDNESDAY, {"a.jpg": [DOG]})
    second = run([wednesday], store, "scheduled__wednesday")
    # Tuesday's export arrives late and a backfill run consumes it
    tuesday = voc_export(tmp_path / "exports" / "2026-01-06", TUESDAY,
                         {"a.jpg": [BIRD], "k.jpg": [CAT]})
    backfill = run([tuesday], store, "backfill__2026-01-06")
    assert backfill["parent"] == second["fingerprint"]
    labels = boxes_of(backfill)
    assert labels["a"] == ["dog"]  # Wednesday's labels are newer than Tuesday's
    assert labels["k"] == ["cat"]
    assert backfill["superseded"] == ["a"]
    assert (diff_of(backfill)["added"], diff_of(backfill)["changed"]) == (["k"], [])
    assert datasets.current_version(store) == backfill["fingerprint"]


def test_rerun_reproduces_its_version_from_the_parent_it_recorded(tmp_path, store, first):
    tuesday = voc_export(tmp_path / "exports" / "2026-01-06", TUESDAY, {"d.jpg": [BIRD]})
    second = run([tuesday], store, "scheduled__tuesday")
    wednesday = voc_export(tmp_path / "exports" / "2026-01-07", WEDNESDAY, {"e.jpg": [CAT]})
    third = run([wednesday], store, "scheduled__wednesday")

    again = run([tuesday], store, "scheduled__tuesday")  # cleared and re-run in Airflow
    assert again["parent"] == first["fingerprint"]  # not the now-current third version
    assert again["fingerprint"] == second["fingerprint"]
    assert again["new_version"] is False and diff_of(again) == diff_of(second)
    assert datasets.current_version(store) == third["fingerprint"]  # a re-run moves nothing
    assert len(datasets.list_versions(store)) == 3


def test_take_all_rebuilds_from_every_export_and_diffs_against_the_current(tmp_path, store,
                                                                           first):
    monday = Path(first["exports"][0]["path"])
    tuesday = voc_export(tmp_path / "exports" / "2026-01-06", TUESDAY,
                         {"a.jpg": [DOG], "d.jpg": [BIRD]}, deleted=["b.jpg"])
    second = run([tuesday], store, "scheduled__tuesday")
    rebuilt = run([tuesday, monday], store, "manual__all", rebuild=True)
    assert rebuilt["fingerprint"] == second["fingerprint"]  # same exports, same content
    assert rebuilt["parent"] == second["fingerprint"]
    assert (rebuilt["added"], rebuilt["changed"], rebuilt["removed"]) == (0, 0, 0)
    # Monday's export is gone: a rebuild holds only what the exports give, no parent content
    without_monday = run([tuesday], store, "manual__all_again", rebuild=True)
    assert sorted(boxes_of(without_monday)) == ["a", "d"]
    assert without_monday["parent"] == second["fingerprint"]
    assert diff_of(without_monday)["removed"] == ["c"]


# --- bad input: a clear message, a data failure, the current version intact ---------------

def _assert_intact(store: Path, current: str, published: list[dict]) -> None:
    assert datasets.current_version(store) == current
    assert datasets.list_versions(store) == published
    assert sorted(p.name for p in store.iterdir() if p.is_dir()) == sorted(
        v["fingerprint"] for v in published)


def test_export_that_removes_every_image_is_refused(tmp_path, store, first):
    published = datasets.list_versions(store)
    tuesday = voc_export(tmp_path / "exports" / "2026-01-06", TUESDAY, {},
                         deleted=["a.jpg", "b.jpg", "c.jpg"])
    with pytest.raises(StageError, match=rf"export {tuesday} \(incremental\) removes every "
                                         r"image: the 3 images of version \w+ would leave") as e:
        run([tuesday], store, "scheduled__tuesday")
    assert e.value.failure is Failure.DATA and "nothing was published" in str(e.value)
    _assert_intact(store, first["fingerprint"], published)


def test_deleted_list_naming_unknown_images_is_refused(tmp_path, store, first):
    published = datasets.list_versions(store)
    tuesday = voc_export(tmp_path / "exports" / "2026-01-06", TUESDAY, {"d.jpg": [BIRD]},
                         deleted=["a.jpg", "zebra_042.jpg", "d.jpg"])
    with pytest.raises(StageError) as e:
        run([tuesday], store, "scheduled__tuesday")
    message = str(e.value)
    assert f"export {tuesday}: its deleted file cannot be applied" in message
    assert f"{tuesday / 'deleted.txt'} line 2: 'zebra_042.jpg' names no image of version " \
           f"{first['fingerprint']}" in message
    assert "line 3: 'd.jpg' is labelled in this export too" in message
    assert "exports.deleted_file" in message and e.value.failure is Failure.DATA
    _assert_intact(store, first["fingerprint"], published)


def test_snapshot_older_than_the_current_version_is_refused(tmp_path, store):
    wednesday = voc_export(tmp_path / "exports" / "labelstudio-wed", WEDNESDAY,
                           {"a.jpg": [CAT], "b.jpg": [DOG]})
    current = run([wednesday], store, "scheduled__wednesday", mode="snapshot")
    published = datasets.list_versions(store)
    monday = voc_export(tmp_path / "exports" / "labelstudio-mon", MONDAY, {"a.jpg": [DOG]})
    with pytest.raises(StageError) as e:
        run([monday], store, "backfill__monday", mode="snapshot")
    message = str(e.value)
    assert f"export {monday} is a snapshot that landed at 2026-01-05T08:00:00.000000+00:00, " \
           f"before the newest export version {current['fingerprint']} absorbed " \
           "(2026-01-07T08:00:00.000000+00:00)" in message
    assert "exports.modes" in message and e.value.failure is Failure.DATA
    _assert_intact(store, current["fingerprint"], published)


# --- the stage: run id, modes and take_exports from the frozen pipeline config --------------

def test_stage_builds_on_the_current_version_and_reports_the_diff(tmp_path):
    from odapi_operators.core.stages.runner import run_stage

    monday = voc_export(tmp_path / "exports" / "labelstudio-1", MONDAY, {"a.jpg": [CAT],
                                                                         "b.jpg": [DOG]})
    tuesday = voc_export(tmp_path / "exports" / "labelstudio-2", TUESDAY, {"a.jpg": [DOG]})
    (tmp_path / "pipeline.yaml").write_text(json.dumps({
        "home": str(tmp_path), "exports": {"path": str(tmp_path / "exports"),
                                           "modes": {"*/labelstudio-*": "snapshot"}},
        "train": {"model_config": "m.yaml", "steps": 1},
        "serving": {"base": "serving", "model_name": "shapes"}}))
    lines: list[str] = []
    first = run_stage("ingest", pipeline=tmp_path / "pipeline.yaml", run_id="r1",
                      inputs={"exports": [str(monday)]}, log=lines.append)
    second = run_stage("ingest", pipeline=tmp_path / "pipeline.yaml", run_id="r2",
                       inputs={"exports": [str(tuesday)]}, log=lines.append)
    assert second.parent == first.fingerprint
    assert (second.added, second.changed, second.removed) == (0, 1, 1)
    assert second.diff == str(tmp_path / "var" / "runs" / "r2" / "ingest" / "diff.json")
    assert second.version == str(tmp_path / "var" / "datasets" / second.fingerprint)
    assert json.loads(Path(second.diff).read_text())["removed"] == ["b"]
    assert second.contract()["diff"] == second.diff  # pushed to XCom
    assert f"version {first.fingerprint} +0 added, ~1 changed, -1 removed" in second.log_line()
    assert f"export {tuesday}: snapshot, landed 2026-01-06T08:00:00" in "\n".join(lines)


def test_an_unknown_mode_is_a_config_error(tmp_path, store):
    export = voc_export(tmp_path / "exports" / "x", MONDAY, {"a.jpg": [CAT]})
    with pytest.raises(StageError, match=r"exports.modes: a mode is one of incremental, "
                                         r"snapshot, got 'snapshots'") as e:
        run([export], store, "r", modes={"*": "snapshots"})
    assert e.value.failure is Failure.CONFIG
