"""The run-directory layout: where every stage of every run keeps its outputs.

    <runs>/<run_id>/<stage>/...           one folder per stage (`runs` from the pipeline config)
    <serving_base>/<model_name>/<version>/ the TF Serving model directory (see push.py)

Stage folders are named by `Stage`; nothing else in the code builds these paths by hand.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum
from pathlib import Path


class Stage(str, Enum):
    CONFIG = "config"
    INGEST = "ingest"
    IMAGES = "images"
    VERIFY = "verify"
    LABEL_MAP = "label_map"
    RECORDS = "records"
    TRAIN = "train"
    EVALUATE = "evaluate"
    GATE = "gate"
    EXPORT = "export"
    PUSH = "push"


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_run_id(run_id: str) -> str:
    """A filesystem-safe form of an Airflow run id (`manual__2026-01-01T00:00:00+00:00`)."""
    cleaned = _UNSAFE.sub("_", run_id).strip("._")
    if not cleaned:
        raise ValueError(f"run id {run_id!r} has no usable characters")
    return cleaned


@dataclass(frozen=True)
class RunLayout:
    """Paths of one pipeline run under the `runs` folder."""

    runs: Path
    run_id: str

    @property
    def root(self) -> Path:
        return Path(self.runs) / safe_run_id(self.run_id)

    def stage(self, stage: Stage | str) -> Path:
        return self.root / Stage(stage).value
