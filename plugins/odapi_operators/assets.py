"""Airflow Assets the odapi DAGs publish and schedule on.

An ingest publishes a dataset-version event (extra: fingerprint, new_version, counts); a push
publishes a served-model event (extra: model name, version, path). The exports asset is the
watched exports location itself: its watcher announces each new complete export.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from airflow.sdk import Asset, AssetWatcher

if TYPE_CHECKING:
    from odapi_operators.core.config import ExportsConfig

DATASET_VERSION = Asset(name="odapi_dataset_version", uri="x-odapi://datasets")
SERVED_MODEL = Asset(name="odapi_served_model", uri="x-odapi://serving")
EXPORTS_ASSET_NAME = "odapi_annotation_exports"


def exports_uri(path: str) -> str | None:
    """The asset URI of an exports location: file:///... or gs://bucket/prefix; None for a
    source no watcher can list (labelstudio://: the sensor pulls it)."""
    if path.startswith("gs://"):
        return path.rstrip("/")
    if "://" in path:
        return None
    return Path(path).resolve().as_uri()


def exports_asset(exports: ExportsConfig) -> Asset | None:
    """The watched exports asset (an `AssetWatcher` running `NewAnnotationExportTrigger` in
    the triggerer), or None when `exports.path` cannot be watched."""
    from odapi_operators.triggers import NewAnnotationExportTrigger

    uri = exports_uri(exports.path)
    if uri is None:
        return None
    trigger = NewAnnotationExportTrigger(exports.path, exports.marker or None,
                                         exports.inactivity_seconds, exports.watch_seconds)
    return Asset(name=EXPORTS_ASSET_NAME, uri=uri,
                 watchers=[AssetWatcher(name="odapi_new_export", trigger=trigger)])
