"""Export ahead: the candidate is exported in its evaluation's process (one TensorFlow start-up,
one trace of the model), and the export stage then only copies that checked export, adding the
run's extras, without TensorFlow; an export ahead of another checkpoint or other settings is
not used."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from conftest import odapi

def _pipeline(tmp_path: Path) -> Path:
    path = tmp_path / "pipeline.yaml"
    path.write_text(json.dumps({
        "home": str(tmp_path), "exports": {"path": "exports"},
        "train": {"model_config": "m.yaml", "steps": 1},
        "serving": {"base": "serving", "model_name": "shapes"},
        "export": {"input_type": "image_bytes", "warmup_images": 3}}))
    return path


def _no_tensorflow(tmp_path: Path) -> dict[str, str]:
    """An environment in which importing TensorFlow fails."""
    fake = tmp_path / "no_tf" / "tensorflow"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('TensorFlow imported')\n")
    return {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(fake.parent), os.environ.get("PYTHONPATH", "")])}


@pytest.mark.slow
def test_evaluation_exports_ahead_and_export_only_adds_the_extras(trained_model, tmp_path):
    model, data = str(trained_model["model_dir"]), str(trained_model["records"])
    pipeline = _pipeline(tmp_path)
    run = ("--pipeline", str(pipeline), "--run-id", "r1")
    evaluated = json.loads(odapi("evaluate", "--model", model, "--data", data, *run).stdout)
    ahead = tmp_path / "var" / "runs" / "r1" / "export_ahead"
    assert evaluated["export_ahead"] == str(ahead), evaluated
    made = json.loads((ahead / "summary.json").read_text())
    trained = json.loads((trained_model["model_dir"] / "summary.json").read_text())
    assert made["checkpoint"] == trained["checkpoint"]  # read without TensorFlow
    assert (made["input_type"], made["model_name"], made["warmup_images"]) == (
        "image_bytes", "shapes", 3), made
    assert made["check"]["warmup_requests"] == 3 and made["check"]["max_difference"] <= 1e-3

    # The same detections as an evaluation that loads the model on its own.
    alone = tmp_path / "alone"
    odapi("evaluate", "--model", model, "--data", data, "--no-export-ahead", "--out", str(alone))
    metrics = tmp_path / "var" / "runs" / "r1" / "evaluate" / "candidate"
    assert json.loads((metrics / "detections.json").read_text()) == json.loads(
        (alone / "detections.json").read_text())
    assert not (alone.parent / "export_ahead").exists()

    # The export stage: no TensorFlow, the checked SavedModel as it was plus the extras.
    decision = tmp_path / "decision.json"
    decision.write_text(json.dumps({"promoted": True}))
    done = odapi("export", "--model-dir", model, "--data", data, *run, "--exported-ahead",
                 str(ahead), "--extras", str(metrics / "metrics.json"), str(decision),
                 env=_no_tensorflow(tmp_path))
    assert "same checkpoint and settings, copied" in done.stdout + done.stderr
    out = tmp_path / "var" / "runs" / "r1" / "export"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ahead"] == str(ahead) and summary["check"] == made["check"]
    assert summary["saved_model"] == str(out / "saved_model")
    assert (out / "saved_model" / "saved_model.pb").read_bytes() == (
        ahead / "saved_model" / "saved_model.pb").read_bytes()
    extra = {p.name for p in (out / "saved_model" / "assets.extra").iterdir()}
    assert {"metrics.json", "decision.json", "label_map.pbtxt", "params.yaml",
            "tf_serving_warmup_requests"} <= extra, extra
    assert "decision.json" not in {p.name for p in (ahead / "saved_model" / "assets.extra")
                                   .iterdir()}  # the export ahead is left as it was


def test_an_export_ahead_of_other_settings_or_checkpoint_is_not_used(tmp_path):
    from odapi_operators.core.model import tfvision
    from odapi_operators.core.model.exporter import _from_ahead

    model = tmp_path / "model"
    model.mkdir()
    (model / "checkpoint").write_text('model_checkpoint_path: "ckpt-60"\n'
                                      'all_model_checkpoint_paths: "ckpt-50"\n'
                                      'all_model_checkpoint_paths: "ckpt-60"\n')
    checkpoint = tfvision.newest_checkpoint(model)
    assert checkpoint == str(model / "ckpt-60")
    moved = tmp_path / "moved"  # a state file naming an absolute prefix keeps it
    moved.mkdir()
    (moved / "checkpoint").write_text(f'model_checkpoint_path: "{model}/ckpt-9"\n')
    assert tfvision.newest_checkpoint(moved) == f"{model}/ckpt-9"
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        tfvision.newest_checkpoint(tmp_path / "ahead")
    settings = {"checkpoint": checkpoint, "input_type": "image_tensor", "model_name": "m",
                "warmup_images": 2, "data": "records"}
    settings = {"checkpoint": checkpoint, "input_type": "image_tensor", "model_name": "m",
                "warmup_images": 2, "data": "records"}
    ahead = tmp_path / "ahead"
    (ahead / "saved_model" / "assets.extra").mkdir(parents=True)
    (ahead / "saved_model" / "saved_model.pb").write_bytes(b"pb")
    lines: list[str] = []
    for changed in ({"checkpoint": str(model / "ckpt-50")}, {"warmup_images": 3},
                    {"input_type": "image_bytes"}):
        (ahead / "summary.json").write_text(json.dumps({**settings, **changed}))
        assert _from_ahead(ahead, settings, tmp_path / "out", [], lines.append) is None
        assert not (tmp_path / "out").exists()
    assert "warmup_images 3, not 2" in lines[1] and "input_type 'image_bytes'" in lines[2]

    (ahead / "summary.json").write_text(json.dumps({**settings, "check": {"ok": 1}}))
    extra = tmp_path / "metrics.json"
    extra.write_text("{}")
    summary = _from_ahead(ahead, settings, tmp_path / "out", [str(extra)], lines.append)
    assert summary["check"] == {"ok": 1} and summary["ahead"] == str(ahead)
    assert (tmp_path / "out" / "saved_model" / "assets.extra" / "metrics.json").is_file()
    shutil.rmtree(ahead)
    assert _from_ahead(ahead, settings, tmp_path / "out2", [], lines.append) is None
    assert "not there" in lines[-1]
