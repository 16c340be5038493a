"""StageOperator in a real dag.test(): bad data fails at once, a transient failure is retried.

The verify stage runs in a child process (`odapi stage run verify ...`), so this also shows
the failure kind crossing the process boundary as an exit status.
"""

from __future__ import annotations

import importlib.util
import textwrap

import yaml

from conftest import ROOT

DAG_FILE = textwrap.dedent("""
    from datetime import datetime, timedelta
    from airflow.sdk import DAG
    from odapi_operators.operators import (IngestAnnotationsOperator,
        ResolvePipelineConfigOperator, VerifyImagesOperator)

    with DAG("stage_failures", schedule=None, start_date=datetime(2026, 1, 1),
             default_args={{"retries": 2, "retry_delay": timedelta(seconds=0)}}) as dag:
        cfg = ResolvePipelineConfigOperator(task_id="config",
                                            pipeline_config={config!r}).output["config"]
        IngestAnnotationsOperator(task_id="ingest_empty", config=cfg, exports=[{empty!r}])
        VerifyImagesOperator(task_id="verify_missing", config=cfg, manifest={missing!r})
""")


def test_bad_data_is_not_retried_and_a_transient_failure_is(tmp_path, airflow_db,
                                                            dag_bundle):
    (tmp_path / "empty").mkdir()
    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump({
        "home": str(tmp_path), "exports": {"path": str(tmp_path / "empty")},
        "train": {"model_config": str(ROOT / "include/configs/models/"
                                               "retinanet_mobile_sample.yaml"), "steps": 1},
        "serving": {"base": "serving", "model_name": "shapes"}}))
    dag_file = dag_bundle / "stage_failures.py"
    dag_file.write_text(DAG_FILE.format(config=str(config), empty=str(tmp_path / "empty"),
                                        missing=str(tmp_path / "no" / "manifest.jsonl")))
    spec = importlib.util.spec_from_file_location("stage_failures", dag_file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    dag_run = module.dag.test()
    tries = {ti.task_id: (str(ti.state), ti.try_number) for ti in dag_run.get_task_instances()}
    assert tries["config"] == ("success", 1)
    # no annotation files: data (exit 4 in a child, StageError in process): failed at once
    assert tries["ingest_empty"] == ("failed", 1), tries
    # a manifest that is not there (yet): an OSError counts as transient and is retried
    assert tries["verify_missing"] == ("failed", 3), tries
