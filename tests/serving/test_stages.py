"""Serving stages through the stage runner: what the run section decides (no TensorFlow)."""

from __future__ import annotations

import json

import pytest

from odapi_operators.core.config import load_pipeline_config
from odapi_operators.core.failures import StageSkipped
from odapi_operators.core.stages.runner import run_stage

from support.fakes import fake_saved_model


def _pipeline(tmp_path, **run):
    (tmp_path / "pipeline.yaml").write_text(json.dumps({
        "home": str(tmp_path), "exports": {"path": "exports"},
        "train": {"model_config": "m.yaml", "steps": 1},
        "serving": {"base": "serving", "model_name": "shapes"}}))
    return load_pipeline_config(tmp_path / "pipeline.yaml",
                                {f"run.{key}": value for key, value in run.items()})


def test_a_dry_run_push_skips_and_leaves_serving_alone(tmp_path):
    model = fake_saved_model(tmp_path / "export", "a")
    with pytest.raises(StageSkipped, match="dry run"):
        run_stage("push", pipeline=_pipeline(tmp_path, dry_run=True), run_id="r1",
                  inputs={"saved_model": str(model)})
    assert not (tmp_path / "serving").exists()


def test_a_push_promotes_and_a_rollback_takes_its_reason_from_the_run(tmp_path):
    pipeline = _pipeline(tmp_path)
    for run_id, tag in (("r1", "a"), ("r2", "b")):
        pushed = run_stage("push", pipeline=pipeline, run_id=run_id,
                           inputs={"saved_model": str(fake_saved_model(tmp_path / tag, tag))})
    assert (pushed.version, pushed.model_extra["stable"]) == (2, 2)
    assert json.loads((tmp_path / "var/runs/r2/push/summary.json").read_text())["version"] == 2
    with pytest.raises(ValueError, match="needs a reason"):
        run_stage("rollback", pipeline=pipeline, run_id="r3")
    back = run_stage("rollback", pipeline=_pipeline(tmp_path, reason="drift"), run_id="r3")
    assert (back.version, back.previous) == (1, 2)
    assert back.path == f"{tmp_path}/serving/shapes/1"
