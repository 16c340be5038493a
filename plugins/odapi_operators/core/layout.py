"""The run-directory layout: where every stage of every run keeps its outputs.

    <runs>/<run_id>/config/pipeline.json           the frozen config (and run section)
    <runs>/<run_id>/<stage>/summary.json           each stage's folder and summary
    <runs>/<run_id>/partitions/part-00003-of-00008/  one partition's images (data/partitions.py)
    <runs>/<run_id>/evaluate/{candidate,production}/metrics.json
    <runs>/<run_id>/export_ahead/saved_model/       the candidate, exported while evaluated
    <runs>/<run_id>/gate/decision.json
    <runs>/<run_id>/report/report.html
    <serving_base>/<model_name>/<version>/         the TF Serving model dir (serving_dir.py)

Folders are named by `Stage`, files by the properties below; nothing else in the code builds
these paths (the registry, the run summary and the operators all ask here).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from enum import Enum
from pathlib import Path


class Stage(str, Enum):
    CONFIG = "config"
    INGEST = "ingest"
    PARTITIONS = "partitions"
    IMAGES = "images"
    VERIFY = "verify"
    LABEL_MAP = "label_map"
    RECORDS = "records"
    TRAIN = "train"
    EVALUATE = "evaluate"
    EVALUATE_CANDIDATE = "evaluate/candidate"
    EVALUATE_PRODUCTION = "evaluate/production"
    GATE = "gate"
    REPORT = "report"
    EXPORT = "export"
    EXPORT_AHEAD = "export_ahead"  # the candidate exported by its evaluation (export_ahead)
    PUSH = "push"
    CANARY = "canary"


SUMMARY = "summary.json"
METRICS = "metrics.json"
MATCHES = "matches.npz"  # per-image COCO matches beside metrics.json (the gate's bootstrap)
DECISION = "decision.json"
PIPELINE = "pipeline.json"
REPORT_PAGE = "report.html"



class RunFile(Enum):
    """The files of a run that other stages and tools read: (folder, name)."""

    CONFIG = (Stage.CONFIG, PIPELINE)
    CANDIDATE_METRICS = (Stage.EVALUATE_CANDIDATE, METRICS)
    PRODUCTION_METRICS = (Stage.EVALUATE_PRODUCTION, METRICS)
    DECISION = (Stage.GATE, DECISION)
    REPORT = (Stage.REPORT, REPORT_PAGE)


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_run_id(run_id: str) -> str:
    """A filesystem-safe form of an Airflow run id (`manual__2026-01-01T00:00:00+00:00`)."""
    cleaned = _UNSAFE.sub("_", run_id).strip("._")
    if not cleaned:
        raise ValueError(f"run id {run_id!r} has no usable characters")
    return cleaned


@dataclass(frozen=True)
class RunLayout:
    """Paths of one pipeline run: under the `runs` folder by run id, or an existing run folder
    (`RunLayout.of(run_dir)`). Strings, so gs:// run folders work too."""

    runs: str | os.PathLike | None = None
    run_id: str | None = None
    folder: str | os.PathLike | None = None

    @classmethod
    def of(cls, run_dir: str | os.PathLike) -> "RunLayout":
        return cls(folder=run_dir)

    @property
    def root(self) -> Path:
        if self.folder is not None:
            return Path(self.folder)
        if self.runs is None or self.run_id is None:
            raise ValueError("a run layout needs a runs folder and a run id, or a run folder")
        return Path(self.runs) / safe_run_id(self.run_id)

    def stage(self, stage: Stage | str) -> Path:
        return self.root / Stage(stage).value

    def summary(self, stage: Stage | str) -> Path:
        return self.stage(stage) / SUMMARY

    def file(self, which: RunFile) -> Path:
        stage, name = which.value
        return self.stage(stage) / name

    @property
    def model_dir(self) -> Path:
        return self.stage(Stage.TRAIN)
