"""Shards spread over workers with Airflow dynamic task mapping, in a real dag.test() run."""

from __future__ import annotations

import json
import textwrap

import yaml

from odapi_operators.core.data.sample_data import generate

from conftest import ROOT

DAG_FILE = textwrap.dedent("""
    from datetime import datetime
    from airflow.sdk import DAG
    from odapi_operators.operators import (FetchImagesOperator, FinishShardsOperator,
        BuildLabelMapOperator, IngestAnnotationsOperator, PlanShardsOperator,
        ResolvePipelineConfigOperator, VerifyImagesOperator, WriteShardOperator)

    with DAG("mapped_shards", schedule=None, start_date=datetime(2026, 1, 1)) as dag:
        cfg = ResolvePipelineConfigOperator(task_id="config", pipeline_config={config!r}).output["config"]
        ingest = IngestAnnotationsOperator(task_id="ingest", config=cfg, exports=[{export!r}])
        fetch = FetchImagesOperator(task_id="fetch", config=cfg, manifest=ingest.output["manifest"])
        verify = VerifyImagesOperator(task_id="verify", config=cfg, manifest=fetch.output["manifest"])
        label_map = BuildLabelMapOperator(task_id="label_map", config=cfg,
                                          manifest=verify.output["manifest"])
        common = dict(config=cfg, manifest=verify.output["manifest"],
                      label_map=label_map.output["label_map"])
        plan = PlanShardsOperator(task_id="plan", **common)
        write = WriteShardOperator.partial(task_id="write_shard", **common).expand(
            shard=plan.output)
        finish = FinishShardsOperator(task_id="finish", plan=plan.output, **common)
        write >> finish
""")


def test_mapped_shards_match_the_single_task_writer(tmp_path, airflow_db, dag_bundle):
    export = tmp_path / "export"
    generate(export, count=30, seed=2, max_side=96)
    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump({
        "home": str(tmp_path), "exports": {"path": str(export)},
        "records": {"shards": {"train": 3, "val": 2}},
        "train": {"model_config": str(ROOT / "include/configs/models/"
                                               "retinanet_mobile_sample.yaml"), "steps": 1},
        "serving": {"base": "serving", "model_name": "shapes"}}))
    dag_file = dag_bundle / "mapped_shards.py"
    dag_file.write_text(DAG_FILE.format(config=str(config), export=str(export)))
    import importlib.util

    spec = importlib.util.spec_from_file_location("mapped_shards", dag_file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    dag_run = module.dag.test()
    assert str(dag_run.state) == "success"
    mapped = [ti for ti in dag_run.get_task_instances() if ti.task_id == "write_shard"]
    assert sorted(ti.map_index for ti in mapped) == [0, 1, 2, 3, 4]
    assert all(str(ti.state) == "success" for ti in mapped)

    records = next((tmp_path / "var" / "runs").iterdir()) / "records"
    names = sorted(p.name for p in records.glob("*.tfrecord"))
    assert names == [f"train-0000{i}-of-00003.tfrecord" for i in range(3)] + [
        f"val-0000{i}-of-00002.tfrecord" for i in range(2)]
    summary = json.loads((records / "summary.json").read_text())

    from odapi_operators.core.data.shard import write_shards

    run_dir = records.parent
    single = write_shards(run_dir / "verify" / "manifest.jsonl",
                          run_dir / "label_map" / "label_map.pbtxt", tmp_path / "single",
                          {"train": 0.8, "val": 0.2}, {"train": 3, "val": 2})
    for split in ("train", "val"):
        assert summary["splits"][split]["images"] == single["splits"][split]["images"]
    for name in names:
        assert (records / name).read_bytes() == (tmp_path / "single" / name).read_bytes()
    assert not [p for p in records.iterdir() if p.name.startswith(".tmp")]
