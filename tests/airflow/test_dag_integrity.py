"""Every DAG file imports cleanly, fast, and without TensorFlow or other heavy modules."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

DAG_FILES = sorted((ROOT / "dags").glob("*.py"))
HEAVY = ("tensorflow", "official", "PIL", "google.cloud.storage", "numpy")

_PROBE = """
import importlib.util, json, sys, time
sys.path[:0] = [sys.argv[2]]
import airflow.sdk  # shared start-up cost, not the DAG file's
start = time.perf_counter()
spec = importlib.util.spec_from_file_location("dag_under_test", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
elapsed = time.perf_counter() - start
heavy = [m for m in json.loads(sys.argv[3]) if m in sys.modules]
dags = [v.dag_id for v in vars(module).values() if type(v).__name__ == "DAG"]
print(json.dumps({"seconds": elapsed, "heavy": heavy, "dags": dags}))
"""


@pytest.mark.parametrize("path", DAG_FILES, ids=lambda p: p.name)
def test_dag_file_imports_fast_without_heavy_modules(path):
    out = subprocess.run([sys.executable, "-c", _PROBE, str(path), str(ROOT / "plugins"),
                          json.dumps(HEAVY)], capture_output=True, text=True, env=os.environ)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["dags"], f"{path.name} defines no DAG"
    assert result["heavy"] == [], f"{path.name} imports {result['heavy']} at parse time"
    assert result["seconds"] < 1.0, f"{path.name} took {result['seconds']:.2f} s to parse"


def test_dagbag_has_no_import_errors(airflow_db):
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(ROOT / "dags"))
    assert bag.import_errors == {}
    assert "odapi_retrain" in bag.dag_ids
    retrain = bag.get_dag("odapi_retrain")
    assert retrain.max_active_runs == 1
    assert {"prepare.ingest", "model.train", "promote.gate", "promote.push"} <= set(
        retrain.task_ids)
