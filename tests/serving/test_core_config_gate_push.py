"""pipeline config loading, the promotion gate, and pushing versions to a TF Serving base."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from odapi_operators.core.config import (
    ConfigError,
    freeze_config,
    load_pipeline_config,
    read_frozen_config,
)
from odapi_operators.core.evaluation.gate import Baseline, GatePolicy, decide, gate
from odapi_operators.core.serving import push as push_mod
from odapi_operators.core.serving.push import push
from odapi_operators.core.serving.serving_dir import RUN_MARKER, production_label_map, versions

from support.fakes import fake_saved_model

ROOT = Path(__file__).resolve().parents[2]
PIPELINE = ROOT / "include" / "configs" / "pipeline.yaml"

# --- config ------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _no_odapi_home(monkeypatch):
    monkeypatch.delenv("ODAPI_HOME", raising=False)


def test_relative_paths_resolve_against_project_root():
    cfg = load_pipeline_config(PIPELINE)
    assert cfg.home == str(ROOT)
    assert cfg.runs == str(ROOT / "var" / "runs")
    assert cfg.exports.path == str(ROOT / "var" / "exports")
    assert cfg.serving.base == str(ROOT / "var" / "serving")
    assert cfg.train.model_config_path == str(
        ROOT / "include" / "configs" / "models" / "retinanet_mobile_sample.yaml")
    assert Path(cfg.train.model_config_path).is_file()
    assert cfg.exports.images_root is None


def test_config_loads_same_from_any_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_pipeline_config(PIPELINE).runs == str(ROOT / "var" / "runs")


def test_odapi_home_env_and_uri_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("ODAPI_HOME", str(tmp_path))
    cfg = load_pipeline_config(PIPELINE, {"serving.base": "gs://bucket/serving"})
    assert cfg.runs == str(tmp_path / "var" / "runs")
    assert cfg.serving.base == "gs://bucket/serving"  # URIs are not made local


def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _yaml() -> dict:
    return yaml.safe_load(PIPELINE.read_text())


@pytest.mark.parametrize("mutate,key", [
    (lambda d: d["exports"].update(bogus=1), "exports.bogus"),
    (lambda d: d.update(trian={"steps": 1}), "trian"),
    (lambda d: d["train"].update(steps=-5), "train.steps"),
    (lambda d: d["train"].update(steps=0), "train.steps"),
    (lambda d: d["serving"].update(model_name="bad name/../x"), "serving.model_name"),
    (lambda d: d["gate"].update(min_ap50=1.5), "gate.min_ap50"),
    (lambda d: d["records"].update(split={"train": 1.0}), "records.split"),
], ids=["unknown-nested", "unknown-top", "negative-steps", "zero-steps", "model-name",
        "ap50-range", "split-no-val"])
def test_invalid_config_names_dotted_key(tmp_path, mutate, key):
    data = _yaml()
    mutate(data)
    path = _write(tmp_path, data)
    with pytest.raises(ConfigError) as info:
        load_pipeline_config(path)
    message = str(info.value)
    assert str(path) in message
    assert f"  {key}:" in message


@pytest.mark.parametrize("name", ["..", "."])
def test_dot_model_names_rejected(name):
    with pytest.raises(ConfigError, match=r"serving\.model_name"):
        load_pipeline_config(PIPELINE, {"serving.model_name": name})


def test_invalid_override_names_dotted_key():
    with pytest.raises(ConfigError, match=r"train\.steps"):
        load_pipeline_config(PIPELINE, {"train.steps": -1})


def test_overrides_apply_and_none_keeps_yaml():
    yaml_steps = _yaml()["train"]["steps"]
    assert load_pipeline_config(PIPELINE, {"train.steps": 7}).train.steps == 7
    kept = load_pipeline_config(PIPELINE, {"train.steps": None, "gate.min_ap50": None})
    assert kept.train.steps == yaml_steps
    assert kept.gate.min_ap50 == _yaml()["gate"]["min_ap50"]
    moved = load_pipeline_config(PIPELINE, {"exports.path": "elsewhere/exports"})
    assert moved.exports.path == str(ROOT / "elsewhere" / "exports")


def test_frozen_config_round_trip(tmp_path):
    cfg = load_pipeline_config(PIPELINE, {"train.steps": 3})
    frozen = freeze_config(cfg, tmp_path / "config")
    assert read_frozen_config(frozen) == cfg


def test_unreadable_config_is_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_pipeline_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_pipeline_config(bad)


# --- gate --------------------------------------------------------------------------------


@pytest.mark.parametrize("metrics,bound,promoted,reason", [
    ({"AP50": 0.7}, 0.5, True, "all checks passed"),
    ({"AP50": 0.5}, 0.5, True, "all checks passed"),
    ({"AP50": 0.3}, 0.5, False, "AP50 0.3 not >= 0.5"),
    ({"AP": 0.9}, 0.5, False, "AP50 None not >= 0.5"),
    ({"AP50": float("nan")}, 0.5, False, "AP50"),
    ({"AP50": 0.99}, None, False, "never promote"),
    ({}, None, False, "never promote"),
], ids=["pass", "equal", "fail", "missing", "nan", "no-threshold", "no-threshold-empty"])
def test_gate_decide(metrics, bound, promoted, reason):
    decision = decide(metrics, GatePolicy(min_ap50=bound), Baseline(version=1, metrics={}))
    assert decision["promoted"] is promoted
    assert reason in decision["reason"]
    # the default `old` slice guard is listed, skipped: these metrics have no slices
    [guard] = [c for c in decision["checks"] if c["kind"] == "slice"]
    assert guard["verdict"] == "skipped" and "without a dataset diff" in guard["note"]
    checks = [c for c in decision["checks"] if c["kind"] != "slice"]
    if bound is None:
        assert checks == []
    else:
        [check] = checks
        assert check["metric"] == "AP50" and check["bound"] == bound
        assert check["passed"] is promoted


def test_gate_writes_decision(tmp_path):
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({"AP50": 0.2}))
    result = gate(metrics, tmp_path / "gate", None)
    written = json.loads((tmp_path / "gate" / "decision.json").read_text())
    assert result["decision"] == str(tmp_path / "gate" / "decision.json")
    assert written["promoted"] is False and "never promote" in written["reason"]
    assert written["metrics"] == str(metrics)


# --- push --------------------------------------------------------------------------------


def numeric_dirs(model_dir: Path) -> list[str]:
    return sorted(p.name for p in model_dir.iterdir() if p.name.isdigit())


def test_three_runs_get_versions_1_2_3(tmp_path):
    serving = tmp_path / "serving"
    for i in (1, 2, 3):
        model = fake_saved_model(tmp_path / f"export{i}", f"run{i}")
        result = push(model, serving, "shapes", f"run{i}")
        assert result["version"] == i
        assert result["path"] == str(serving / "shapes" / str(i))
        assert result["versions"] == list(range(1, i + 1))
        version_dir = serving / "shapes" / str(i)
        assert (version_dir / "saved_model.pb").read_bytes() == f"graph-run{i}".encode()
        assert (version_dir / "variables" / "variables.index").is_file()
        assert json.loads((version_dir / RUN_MARKER).read_text())["run_id"] == f"run{i}"
    assert versions(serving / "shapes") == [1, 2, 3]


def test_same_run_pushed_twice_returns_same_version(tmp_path):
    serving = tmp_path / "serving"
    model = fake_saved_model(tmp_path / "export", "a")
    first = push(model, serving, "shapes", "manual__2026-01-01T00:00:00+00:00")
    again = push(model, serving, "shapes", "manual__2026-01-01T00:00:00+00:00")
    assert first["version"] == again["version"] == 1
    assert numeric_dirs(serving / "shapes") == ["1"]
    other = push(model, serving, "shapes", "scheduled__x")
    assert other["version"] == 2


def test_version_dir_never_overwritten(tmp_path):
    serving = tmp_path / "serving"
    model_dir = serving / "shapes"
    (model_dir / "4").mkdir(parents=True)  # e.g. a version copied in by hand, no ledger
    (model_dir / "4" / "hand.txt").write_text("keep")
    push(fake_saved_model(tmp_path / "e1", "one"), serving, "shapes", "r1")
    push(fake_saved_model(tmp_path / "e2", "two"), serving, "shapes", "r2")
    assert numeric_dirs(model_dir) == ["4", "5", "6"]
    assert sorted(p.name for p in (model_dir / "4").iterdir()) == ["hand.txt"]
    assert (model_dir / "5" / "saved_model.pb").read_bytes() == b"graph-one"
    assert (model_dir / "6" / "saved_model.pb").read_bytes() == b"graph-two"


def test_deleted_version_number_not_reused(tmp_path):
    serving = tmp_path / "serving"
    for i in (1, 2):
        push(fake_saved_model(tmp_path / f"e{i}", str(i)), serving, "shapes", f"r{i}")
    shutil.rmtree(serving / "shapes" / "2")
    assert push(fake_saved_model(tmp_path / "e3", "3"), serving, "shapes", "r3")["version"] == 3


def _flaky_copytree(monkeypatch):
    real = shutil.copytree

    def copy_then_fail(src, dst, *args, **kwargs):
        real(src, dst, *args, **kwargs)
        raise OSError("No space left on device (simulated)")

    monkeypatch.setattr(push_mod.shutil, "copytree", copy_then_fail)


def test_failed_push_leaves_no_version_and_rerun_gets_fresh_number(tmp_path, monkeypatch):
    serving = tmp_path / "serving"
    model_dir = serving / "shapes"
    push(fake_saved_model(tmp_path / "e1", "one"), serving, "shapes", "r1")
    model = fake_saved_model(tmp_path / "e2", "two")
    _flaky_copytree(monkeypatch)
    with pytest.raises(OSError, match="simulated"):
        push(model, serving, "shapes", "r2")
    assert numeric_dirs(model_dir) == ["1"]
    assert versions(model_dir) == [1]
    monkeypatch.undo()
    result = push(model, serving, "shapes", "r2")
    assert result["version"] > 1
    assert numeric_dirs(model_dir) == ["1", str(result["version"])]
    version_dir = model_dir / str(result["version"])
    assert (version_dir / "saved_model.pb").read_bytes() == b"graph-two"
    assert (version_dir / "variables" / "variables.data-00000-of-00001").stat().st_size == 1000
    assert json.loads((version_dir / RUN_MARKER).read_text())["run_id"] == "r2"
    assert result["versions"] == [1, result["version"]]
    # the number issued to the failed attempt is never handed out again either
    third = push(fake_saved_model(tmp_path / "e3", "three"), serving, "shapes", "r3")
    assert third["version"] == result["version"] + 1


def test_failed_push_leaves_no_temporary_copy(tmp_path, monkeypatch):
    serving = tmp_path / "serving"
    model = fake_saved_model(tmp_path / "e", "x")
    _flaky_copytree(monkeypatch)
    with pytest.raises(OSError):
        push(model, serving, "shapes", "r1")
    monkeypatch.undo()
    push(model, serving, "shapes", "r1")
    assert [p.name for p in (serving / "shapes").iterdir() if p.name.startswith(".tmp-")] == []


def test_versions_ignores_tmp_and_incomplete_dirs(tmp_path):
    model_dir = tmp_path / "shapes"
    for name in ("1", ".tmp-7", "3", "latest"):
        (model_dir / name).mkdir(parents=True)
        (model_dir / name / "saved_model.pb").write_bytes(b"x")
    (model_dir / "9").mkdir()  # no saved_model.pb: Serving would not load it
    (model_dir / "12").mkdir()
    (model_dir / "12" / "saved_model.pb").write_bytes(b"x")
    assert versions(model_dir) == [1, 3, 12]
    assert versions(tmp_path / "absent") == []


def test_production_label_map_is_newest_versions(tmp_path):
    serving = tmp_path / "serving"
    assert production_label_map(serving, "shapes") is None
    push(fake_saved_model(tmp_path / "e1", "1", "item { id: 1 name: 'a' }"), serving, "shapes",
         "r1")
    push(fake_saved_model(tmp_path / "e2", "2", "item { id: 1 name: 'a' }\n"
                                                 "item { id: 2 name: 'b' }"), serving, "shapes",
         "r2")
    (serving / "shapes" / ".tmp-9" / "assets.extra").mkdir(parents=True)
    (serving / "shapes" / ".tmp-9" / "saved_model.pb").write_bytes(b"x")
    (serving / "shapes" / ".tmp-9" / "assets.extra" / "label_map.pbtxt").write_text("tmp")
    found = production_label_map(serving, "shapes")
    assert found == str(serving / "shapes" / "2" / "assets.extra" / "label_map.pbtxt")
    assert "name: 'b'" in Path(found).read_text()


def test_push_requires_saved_model(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="saved_model.pb"):
        push(tmp_path / "empty", tmp_path / "serving", "shapes", "r1")
    assert not (tmp_path / "serving" / "shapes").exists() or \
        numeric_dirs(tmp_path / "serving" / "shapes") == []
