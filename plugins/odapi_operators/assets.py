"""Airflow Assets the odapi DAGs publish and schedule on.

An ingest publishes a dataset-version event (extra: fingerprint, new_version, counts); a push
publishes a served-model event (extra: model name, version, path).
"""

from __future__ import annotations

from airflow.sdk import Asset

DATASET_VERSION = Asset(name="odapi_dataset_version", uri="x-odapi://datasets")
SERVED_MODEL = Asset(name="odapi_served_model", uri="x-odapi://serving")
