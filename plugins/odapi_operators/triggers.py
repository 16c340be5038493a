"""Triggers: waits that run in the triggerer, so a deferred sensor holds no worker slot."""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator

from airflow.triggers.base import BaseTrigger, TriggerEvent


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
        from odapi_operators.core.data.exports import scan_exports

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
