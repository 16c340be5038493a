"""Triggers: waits that run in the triggerer, so a deferred sensor holds no worker slot, and
the export watcher whose events start runs."""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator

from airflow.triggers.base import BaseEventTrigger, BaseTrigger, TriggerEvent

from odapi_operators.core.data.exports import scan_exports


class AnnotationExportTrigger(BaseTrigger):
    """Poll an export folder or gs:// prefix until at least one complete export exists.

    Storage calls block, so each poll runs in a thread. Fires one event: `{"status":
    "success", "exports": [paths]}`, or `{"status": "error", "message": ...}` on a storage
    error. `snapshot` carries an inactivity check started by the sensor's own first look.
    """

    def __init__(self, path: str, marker: str | None = None, inactivity_seconds: float = 0,
                 poll_interval: float = 60.0, snapshot: dict | None = None) -> None:
        super().__init__()
        self.path = path
        self.marker = marker
        self.inactivity_seconds = inactivity_seconds
        self.poll_interval = poll_interval
        self.snapshot = snapshot or {}

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return ("odapi_operators.triggers.AnnotationExportTrigger",
                {"path": self.path, "marker": self.marker,
                 "inactivity_seconds": self.inactivity_seconds,
                 "poll_interval": self.poll_interval, "snapshot": self.snapshot})

    async def run(self) -> AsyncIterator[TriggerEvent]:
        snapshot = self.snapshot
        while True:
            try:
                found, snapshot = await asyncio.to_thread(
                    scan_exports, self.path, self.marker, self.inactivity_seconds, snapshot)
            except OSError as exc:  # StorageError is one; every message names the path
                yield TriggerEvent({"status": "error",
                                    "message": f"cannot list exports at {self.path}: {exc}"})
                return
            if found:
                self.log.info("%d complete export(s) at %s", len(found), self.path)
                yield TriggerEvent({"status": "success", "exports": [e.path for e in found]})
                return
            await asyncio.sleep(self.poll_interval)


class NewAnnotationExportTrigger(BaseEventTrigger):
    """Watch an export folder or gs:// prefix; one event per new complete export.

    Runs in the triggerer for an `AssetWatcher` (assets.py), so each event becomes an asset
    event and a run of the DAGs scheduled on that asset; events that arrive together may
    become one run, and the exports ledger still decides what a run consumes.

    An export is announced once it is complete (`scan_exports`: marker present, or unchanged
    for `inactivity_seconds`) and its listing also stood still between two looks, so a
    marker written before the last image arrived does not start a run on half an export.
    What was announced (export path -> fingerprint) lives in the watched asset's state store,
    so a restarted triggerer does not announce it again; a re-delivery with other content
    (another fingerprint) is announced anew. An export is recorded after its event is
    yielded: a crash in between announces it twice (at least once, never lost), which costs
    one run that finds nothing new. Listing errors are logged and retried at the next look.
    """

    ANNOUNCED_KEY = "announced"

    def __init__(self, path: str, marker: str | None = None, inactivity_seconds: float = 0,
                 poll_interval: float = 10.0) -> None:
        super().__init__()
        self.path = path
        self.marker = marker
        self.inactivity_seconds = inactivity_seconds
        self.poll_interval = poll_interval
        self._announced_here: dict[str, str] = {}  # without a state store (dag.test, tests)

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return ("odapi_operators.triggers.NewAnnotationExportTrigger",
                {"path": self.path, "marker": self.marker,
                 "inactivity_seconds": self.inactivity_seconds,
                 "poll_interval": self.poll_interval})

    async def _load_announced(self) -> dict[str, str]:
        if self.asset_state_store is None:
            return dict(self._announced_here)
        stored = await self.asset_state_store.aget(self.ANNOUNCED_KEY)
        return dict(stored) if isinstance(stored, dict) else {}

    async def _save_announced(self, announced: dict[str, str]) -> None:
        if self.asset_state_store is None:
            self._announced_here = dict(announced)
        else:
            await self.asset_state_store.aset(self.ANNOUNCED_KEY, announced)

    async def run(self) -> AsyncIterator[TriggerEvent]:
        announced = await self._load_announced()
        snapshot: dict = {}
        last_states: dict[str, str] = {}  # export path -> listing state at the previous look
        while True:
            try:
                found, snapshot = await asyncio.to_thread(
                    scan_exports, self.path, self.marker, self.inactivity_seconds, snapshot)
            except OSError as exc:  # StorageError is one; a transient outage must not stop us
                self.log.warning("cannot list exports at %s (looking again in %s s): %s",
                                 self.path, self.poll_interval, exc)
                await asyncio.sleep(self.poll_interval)
                continue
            settled = [e for e in found if last_states.get(e.path) == e.state]
            last_states = {e.path: e.state for e in found}
            # forget exports that are gone, so the stored state stays as small as the folder
            kept = {path: fp for path, fp in announced.items() if path in last_states}
            changed = kept != announced
            announced = kept
            for export in settled:
                if announced.get(export.path) == export.fingerprint:
                    continue
                self.log.info("new complete export %s", export.path)
                yield TriggerEvent({"export": export.path, "fingerprint": export.fingerprint,
                                    "landed_at": export.landed_at})
                announced[export.path] = export.fingerprint
                await self._save_announced(announced)
                changed = False
            if changed:
                await self._save_announced(announced)
            await asyncio.sleep(self.poll_interval)
