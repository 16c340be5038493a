"""Sensors that wait for annotation exports."""

from __future__ import annotations

from typing import Any, Sequence

from airflow.sdk import BaseSensorOperator, PokeReturnValue


class AnnotationExportSensor(BaseSensorOperator):
    """Wait until the configured export folder holds at least one complete export.

    Returns (as XCom) the list of complete export folders. Use `mode="reschedule"` for long
    waits so no worker slot is held.
    """

    template_fields: Sequence[str] = ("config",)

    def __init__(self, *, config: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.config = config

    def poke(self, context: Any) -> PokeReturnValue:
        from odapi_operators.core.config import read_frozen_config
        from odapi_operators.core.exports import find_complete_exports

        exports = read_frozen_config(self.config).exports
        found = find_complete_exports(exports.path, exports.marker)
        self.log.info("%d complete export(s) in %s", len(found), exports.path)
        return PokeReturnValue(is_done=bool(found), xcom_value=found)
