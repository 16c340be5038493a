"""NewAnnotationExportTrigger (the exports asset's watcher) on real folders and a GCS emulator,
and the exports asset that schedules odapi_retrain. The real triggerer and scheduler are in
tests/e2e/test_event_driven.py."""

from __future__ import annotations

import asyncio
import shutil
import threading
import time
from pathlib import Path

import pytest
import yaml

from odapi_operators.assets import EXPORTS_ASSET_NAME, exports_asset, exports_uri
from odapi_operators.core import storage
from odapi_operators.core.config import ExportsConfig
from odapi_operators.triggers import NewAnnotationExportTrigger

from conftest import SAMPLE_MODEL

pytestmark = pytest.mark.timeout(60)
LOOK = 0.05  # seconds between the trigger's looks


class StateStore:
    """The async half of Airflow's AssetStateStoreAccessors (what the triggerer injects),
    over a dict that outlives trigger instances, as the metadata DB does."""

    def __init__(self) -> None:
        self.values: dict = {}

    async def aget(self, key: str, default=None):
        return self.values.get(key, default)

    async def aset(self, key: str, value) -> None:
        self.values[key] = value


def _trigger(path: str, store: StateStore | None = None, **kwargs) -> NewAnnotationExportTrigger:
    trigger = NewAnnotationExportTrigger(path, "_SUCCESS", poll_interval=LOOK, **kwargs)
    trigger.asset_state_store = store
    return trigger


def _events(trigger: NewAnnotationExportTrigger, seconds: float,
            during=None) -> list[dict]:
    """The payloads `trigger` yields in `seconds` (its run() is endless); `during` runs in a
    thread meanwhile, as an exporter writing files would."""
    found: list[dict] = []

    async def consume() -> None:
        async for event in trigger.run():
            found.append(event.payload)

    async def main() -> None:
        worker = threading.Thread(target=during) if during else None
        if worker:
            worker.start()
        try:
            await asyncio.wait_for(consume(), seconds)
        except TimeoutError:
            pass
        finally:
            if worker:
                await asyncio.to_thread(worker.join)

    asyncio.run(main())
    return found


def _export(root: str, name: str, files: int = 1) -> str:
    for i in range(files):
        storage.write_text(f"{root}/{name}/ann{i}.xml", "<annotation/>")
    storage.write_text(f"{root}/{name}/_SUCCESS", "")
    return f"{root}/{name}"


def test_fires_once_per_new_complete_export_and_remembers_across_restarts(tmp_path: Path):
    root = str(tmp_path / "exports")
    store = StateStore()
    first = _export(root, "batch-1")
    storage.write_text(f"{root}/in-progress/ann0.xml", "<annotation/>")  # no marker yet

    assert [e["export"] for e in _events(_trigger(root, store), 0.5)] == [first]
    assert store.values["announced"].keys() == {first}

    # A new trigger instance (a restarted triggerer) with the same store: nothing again.
    second = _export(root, "batch-2")
    events = _events(_trigger(root, store), 0.5)
    assert [e["export"] for e in events] == [second]
    assert events[0]["fingerprint"] and events[0]["landed_at"] > 0
    assert _events(_trigger(root, store), 0.4) == []

    # Re-delivered with other content: announced anew. Removed: forgotten.
    storage.write_text(f"{first}/ann1.xml", "<annotation/>")
    assert [e["export"] for e in _events(_trigger(root, store), 0.5)] == [first]
    shutil.rmtree(second)
    assert _events(_trigger(root, store), 0.3) == []
    assert store.values["announced"].keys() == {first}


def test_waits_until_a_marked_export_stops_changing(tmp_path: Path):
    root = str(tmp_path / "exports")
    _export(root, "batch-1")
    stop = time.monotonic() + 0.8

    def still_uploading() -> None:  # the marker came first; images keep arriving
        n = 0
        while time.monotonic() < stop:
            storage.write_text(f"{root}/batch-1/late{n}.jpg", "x")
            n += 1
            time.sleep(LOOK / 3)

    started = time.monotonic()
    trigger = _trigger(root)
    events = _events(trigger, 0.7, during=still_uploading)
    assert events == [], "announced while its files were still changing"
    events = _events(trigger, 1.0)
    assert [e["export"] for e in events] == [f"{root}/batch-1"]
    assert time.monotonic() - started < 3


def test_without_a_state_store_it_remembers_in_the_instance(tmp_path: Path):
    root = str(tmp_path / "exports")
    _export(root, "batch-1")
    trigger = _trigger(root)
    assert len(_events(trigger, 0.4)) == 1
    assert _events(trigger, 0.3) == []


def test_watches_a_gcs_prefix(gcs_emulator):
    root = f"{gcs_emulator}/watched-{time.time_ns()}"
    store = StateStore()
    storage.write_text(f"{root}/half/ann0.xml", "<annotation/>")
    exported = _export(root, "batch-1", files=3)
    trigger = _trigger(root, store)
    trigger.poll_interval = 0.2  # an HTTP listing per look
    assert [e["export"] for e in _events(trigger, 2.0)] == [exported]
    assert _events(_trigger(root, store), 1.0) == []


def test_a_listing_error_is_retried_not_fatal(tmp_path: Path, monkeypatch):
    from odapi_operators import triggers

    root = str(tmp_path / "exports")
    _export(root, "batch-1")
    real, calls = triggers.scan_exports, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) <= 2:
            raise OSError("503 from the bucket")
        return real(*args, **kwargs)

    monkeypatch.setattr(triggers, "scan_exports", flaky)
    assert [e["export"] for e in _events(_trigger(root), 0.6)] == [f"{root}/batch-1"]


def test_exports_asset_has_a_real_uri_and_a_watcher(tmp_path: Path):
    asset = exports_asset(ExportsConfig(path=str(tmp_path / "exports"), marker=None,
                                        inactivity_seconds=30, watch_seconds=2))
    assert asset.name == EXPORTS_ASSET_NAME
    assert asset.uri == f"file://{tmp_path}/exports"
    [watcher] = asset.watchers
    classpath, kwargs = watcher.trigger.serialize()
    assert classpath == "odapi_operators.triggers.NewAnnotationExportTrigger"
    assert kwargs == {"path": str(tmp_path / "exports"), "marker": None,
                      "inactivity_seconds": 30, "poll_interval": 2}
    assert exports_uri("gs://labels/exports/") == "gs://labels/exports"
    assert exports_asset(ExportsConfig(path="labelstudio://ls/projects/3")) is None


def test_retrain_runs_on_export_events_or_nightly(tmp_path: Path, monkeypatch, load_dag):
    from airflow.sdk import AssetOrTimeSchedule, CronDataIntervalTimetable

    config = {"home": str(tmp_path), "exports": {"path": "exports"},
              "train": {"model_config": str(SAMPLE_MODEL), "steps": 1},
              "serving": {"base": "serving", "model_name": "m"}}
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(config))
    monkeypatch.setenv("ODAPI_PIPELINE_CONFIG", str(tmp_path / "pipeline.yaml"))
    dag = load_dag("odapi_retrain")
    assert isinstance(dag.timetable, AssetOrTimeSchedule)
    # the cron part keeps real data intervals: backfills and the ledger's interval rule
    assert isinstance(dag.timetable.timetable, CronDataIntervalTimetable)
    asset = dag.timetable.asset_condition
    assert asset.uri == f"file://{tmp_path}/exports"
    assert asset.watchers[0].trigger.path == str(tmp_path / "exports")
    assert dag.task_dict["wait_for_export"].look_once_for == ("asset_triggered", "manual")
