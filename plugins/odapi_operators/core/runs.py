"""Reading a finished (or failed) run back from its folder: what it consumed and produced."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from odapi_operators.core.layout import RunFile, RunLayout, Stage


def latest_run(runs: str | Path) -> Path:
    """The most recently modified run folder under `runs`."""
    candidates = [p for p in Path(runs).iterdir() if p.is_dir()] if Path(runs).is_dir() else []
    if not candidates:
        raise FileNotFoundError(f"{runs}: no runs yet")
    return max(candidates, key=lambda p: p.stat().st_mtime)


def _read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def summarize_run(run_dir: str | Path) -> dict[str, Any]:
    """Images, boxes, AP/AP50, the gate decision and the pushed Serving path of one run."""
    layout = RunLayout.of(run_dir)
    run = layout.root
    ingest = _read(layout.summary(Stage.INGEST))
    verify = _read(layout.summary(Stage.VERIFY))
    metrics = _read(layout.file(RunFile.CANDIDATE_METRICS))
    production = _read(layout.file(RunFile.PRODUCTION_METRICS))
    decision = _read(layout.file(RunFile.DECISION))
    pushed = _read(layout.summary(Stage.PUSH))
    train = _read(layout.summary(Stage.TRAIN))
    return {
        "run": str(run),
        "images": ingest.get("images"),
        "boxes": ingest.get("boxes"),
        "rejected": ingest.get("rejected"),
        "quarantined": verify.get("failed"),
        "train_steps": train.get("steps"),
        "started_from": (train.get("start") or {}).get("reason"),
        "AP": metrics.get("AP"),
        "AP50": metrics.get("AP50"),
        "production_AP50": production.get("AP50"),
        "promoted": decision.get("promoted"),
        "decision": decision.get("reason"),
        "serving_path": pushed.get("path"),
        "report": str(layout.file(RunFile.REPORT)),
    }
