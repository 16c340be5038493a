"""A run of odapi_retrain with nothing new costs nothing: it ends in seconds, starts no
TensorFlow and copies no image.

That is the run an export event starts when the nightly run (or an earlier event's run)
already consumed the export, and what a person gets who triggers the DAG with nothing new. It
runs as a real `dag.test()` in a fresh interpreter, so "no TensorFlow" is what that process
imported, not what earlier tests left in this one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from odapi_operators.core.data.exports import describe_export
from odapi_operators.core.data.ledger import Ledger
from odapi_operators.core.data.sample_data import MARKER, generate
from odapi_operators.core.layout import RunLayout

from conftest import ROOT, SAMPLE_MODEL

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]
HEAVY = ("tensorflow", "official", "PIL", "numpy")

_RUN = """
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("odapi_retrain_no_new", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
run = module.dag.test()
print(json.dumps({
    "state": str(run.state), "run_id": run.run_id,
    "seconds": (run.end_date - run.start_date).total_seconds(),
    "tasks": {ti.task_id: str(ti.state) for ti in run.get_task_instances()},
    "heavy": [m for m in json.loads(sys.argv[2]) if m in sys.modules]}))
"""


def test_a_run_with_nothing_new_skips_everything_heavy(tmp_path: Path, dag_bundle: Path,
                                                       airflow_db: Path) -> None:
    export = tmp_path / "exports" / "batch-1"
    generate(export, count=4, seed=5, max_side=64)
    config = {"home": str(tmp_path), "exports": {"path": "exports"},
              "train": {"model_config": str(SAMPLE_MODEL), "steps": 1,
                        "placement": {"pool": None}},
              "serving": {"base": "serving", "model_name": "shapes"}}
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(config))
    # an earlier run (the nightly one) consumed the export before this run started
    ledger = Ledger(tmp_path / "var" / "exports-ledger.jsonl")
    assert ledger.claim("scheduled__earlier", [describe_export(export, MARKER)]) == [
        str(export)]
    link = dag_bundle / "odapi_retrain.py"
    if not link.exists():
        link.symlink_to(ROOT / "dags" / "odapi_retrain.py")

    done = subprocess.run(
        [sys.executable, "-c", _RUN, str(ROOT / "dags" / "odapi_retrain.py"),
         json.dumps(HEAVY)], capture_output=True, text=True, timeout=150,
        env={**os.environ, "ODAPI_PIPELINE_CONFIG": str(tmp_path / "pipeline.yaml")})
    assert done.returncode == 0, done.stderr[-4000:]
    run = json.loads(done.stdout.strip().splitlines()[-1])

    assert run["state"] == "success", run
    ran = {task for task, state in run["tasks"].items() if state == "success"}
    assert ran == {"resolve_config", "wait_for_export", "register_run"}, run["tasks"]
    assert run["tasks"]["select_exports"] == "skipped"
    assert {state for task, state in run["tasks"].items()
            if task.startswith(("prepare.", "model.", "promote."))} == {"skipped"}, run["tasks"]
    assert run["heavy"] == [], f"a run with nothing new imported {run['heavy']}"
    assert run["seconds"] < 60, run
    run_dir = RunLayout(tmp_path / "var" / "runs", run["run_id"]).root
    assert sorted(p.name for p in run_dir.iterdir()) == ["config"], "a stage wrote its folder"
    assert not (tmp_path / "var" / "images").exists(), "images were copied"
    assert ledger.taken_by(run["run_id"]) == []
    print(f"\nno-new run: {run['seconds']:.1f} s (dag.test)")
