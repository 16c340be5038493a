"""Sensors that wait for annotation exports."""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Sequence

from airflow.sdk import BaseSensorOperator, PokeReturnValue
from airflow.sdk.configuration import conf
from airflow.sdk.exceptions import AirflowException


class AnnotationExportSensor(BaseSensorOperator):
    """Wait until the configured export folder (local or gs://) holds a complete export.

    Returns (as XCom) the list of complete export paths. With `exports.path`
    `labelstudio://<connection id>/projects/<id>` it asks that Label Studio project instead:
    when its annotations changed since the last pull it pulls an export folder into
    `exports.labelstudio_pulls`, and returns the newest pull (a project is polled from the
    worker, never deferred: its client needs the connection). `deferrable=True` waits in the
    triggerer (no worker slot held); otherwise poke, or `mode="reschedule"` for long waits.
    `marker` and `inactivity_seconds` override the frozen config's `exports` section
    (`marker=""`: no marker, wait for `inactivity_seconds` without changes instead).
    Runs whose type is in `look_once_for` (e.g. `asset_triggered`, `manual`) do not wait: one
    look, and what it found, maybe nothing, goes on to `select_exports` (which skips the run
    when nothing is new), so a run started by an export event or by hand never holds its
    slot for hours.
    """

    template_fields: Sequence[str] = ("config",)
    _SNAPSHOT_KEY = "export_snapshot"

    def __init__(self, *, config: Any, marker: str | None = None,
                 inactivity_seconds: float | None = None, look_once_for: Sequence[str] = (),
                 deferrable: bool = conf.getboolean("operators", "default_deferrable",
                                                    fallback=False),
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.config = config
        self.marker = marker
        self.inactivity_seconds = inactivity_seconds
        self.deferrable = deferrable
        self.look_once_for = tuple(look_once_for)
        self._snapshot: dict | None = None

    def watch(self) -> tuple[str, str | None, float]:
        """(path, marker, inactivity_seconds): the constructor's overrides, else the config's."""
        from odapi_operators.core.config import read_frozen_config

        exports = read_frozen_config(self.config).exports
        marker = exports.marker if self.marker is None else self.marker
        inactivity = self.inactivity_seconds
        if inactivity is None:  # the config may not have the key (yet)
            inactivity = getattr(exports, "inactivity_seconds", 0)
        return exports.path, marker or None, inactivity

    def poke(self, context: Any) -> PokeReturnValue:
        from odapi_operators.core.data.exports import scan_exports
        from odapi_operators.core.labeling.labelstudio_client import ProjectSource

        path, marker, inactivity = self.watch()
        if (source := ProjectSource.parse(path)) is not None:
            return self._poke_project(source, marker)
        # Reschedule mode builds a new sensor per poke: keep the snapshot in the state store.
        store = context.get("task_state_store") if self.reschedule and not marker else None
        previous = store.get(self._SNAPSHOT_KEY) if store is not None else self._snapshot
        found, self._snapshot = scan_exports(path, marker, inactivity, previous)
        if store is not None:
            store.set(self._SNAPSHOT_KEY, self._snapshot)
        self.log.info("%d complete export(s) at %s", len(found), path)
        return PokeReturnValue(is_done=bool(found), xcom_value=[e.path for e in found])

    def _poke_project(self, source: Any, marker: str | None) -> PokeReturnValue:
        from odapi_operators.core.config import read_frozen_config
        from odapi_operators.core.labeling.labelstudio_client import watch_project
        from odapi_operators.hooks import LabelStudioHook

        pulls = read_frozen_config(self.config).exports.labelstudio_pulls
        newest, pulled = watch_project(LabelStudioHook(source.conn_id).get_conn(),
                                       source.project, pulls, marker or "_SUCCESS")
        if pulled:
            self.log.info("pulled %d annotated task(s) of project %d into %s", pulled["tasks"],
                          source.project, pulled["out"])
        return PokeReturnValue(is_done=newest is not None, xcom_value=[newest] if newest else [])

    def execute(self, context: Any) -> Any:
        from odapi_operators.core.config import read_frozen_config
        from odapi_operators.core.labeling.labelstudio_client import ProjectSource

        if read_frozen_config(self.config).run.type in self.look_once_for:
            return self.poke(context).xcom_value
        if not self.deferrable or ProjectSource.parse(self.watch()[0]) is not None:
            return super().execute(context)
        first = self.poke(context)
        if first.is_done:
            return first.xcom_value
        from odapi_operators.triggers import AnnotationExportTrigger

        path, marker, inactivity = self.watch()
        self.defer(trigger=AnnotationExportTrigger(path, marker, inactivity, self.poke_interval,
                                                   self._snapshot),
                   method_name="execute_complete", timeout=timedelta(seconds=self.timeout))

    def execute_complete(self, context: Any, event: Any = None) -> list[str]:
        """Resume from the trigger; a missing, failed or malformed event fails the task."""
        if not isinstance(event, dict) or event.get("status") != "success":
            message = event.get("message") if isinstance(event, dict) else None
            raise AirflowException(f"{self.task_id}: waiting for exports failed: "
                                   f"{message or f'unexpected trigger event {event!r}'}")
        exports = event.get("exports")
        if not exports or not all(isinstance(p, str) for p in exports):
            raise AirflowException(f"{self.task_id}: trigger reported success without export "
                                   f"paths: {event!r}")
        self.log.info("%d complete export(s): %s", len(exports), exports)
        return list(exports)
