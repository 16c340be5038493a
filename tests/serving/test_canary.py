"""Canary before stable (`promote.canary`): the push labels `canary`, the canary check replays
warmup requests and val images against canary and stable through Serving (the stand-in, on
the session's real SavedModel) and moves `stable` only if latency and agreement hold; a failed
check leaves stable alone, stops serving the canary and says why (decision.json, registry).
The label a push moves follows the decision's approval (no TensorFlow for those).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from odapi_operators.core.config import ConfigError, load_pipeline_config
from odapi_operators.core.evaluation import decision as decision_file
from odapi_operators.core.failures import StageSkipped
from odapi_operators.core.serving import models_config as serving_config
from odapi_operators.core.serving import registry
from odapi_operators.core.stages.runner import run_stage

from support.fakes import fake_saved_model


def _pipeline(root: Path, serving: dict | None = None, promote: dict | None = None,
              **sections: dict):
    (root / "pipeline.yaml").write_text(yaml.safe_dump({
        "home": str(root), "exports": {"path": "exports"},
        "train": {"model_config": "m.yaml", "steps": 1},
        "serving": {"base": "serving", "model_name": "shapes", **(serving or {})},
        "promote": promote or {}, **sections}))
    return load_pipeline_config(root / "pipeline.yaml")


def _decision(root: Path, name: str, approval: dict | None = None) -> str:
    """A gate decision (promoted), with an approval when given."""
    path = root / f"{name}.json"
    path.write_text(json.dumps({"promoted": True, "rule": "checks",
                                **({"approval": approval} if approval else {})}))
    return str(path)


def _labels(root: Path) -> dict[str, int]:
    config = serving_config.read(root / "serving" / "models.config")
    return serving_config.labels(serving_config.entry(config, "shapes"))


def _served(root: Path) -> list[int]:
    entry = serving_config.entry(serving_config.read(root / "serving" / "models.config"), "shapes")
    return list(entry.model_version_policy.specific.versions)


@pytest.mark.parametrize("approval, canary_first, label", [
    (None, False, "stable"), (None, True, "canary"),
    ({"choice": "stable", "by": "ana"}, True, "canary"),
    ({"choice": "canary", "by": "ana"}, False, "canary"),
    ({"choice": "reject", "by": "ana"}, True, None)])
def test_the_label_a_push_moves(approval, canary_first, label):
    decision = {"promoted": True, **({"approval": approval} if approval else {})}
    assert decision_file.label_to_move(decision, canary_first) == label


def test_a_push_follows_the_approval(tmp_path):
    pipeline = _pipeline(tmp_path)
    model = str(fake_saved_model(tmp_path / "export", "a"))
    rejected = _decision(tmp_path, "rejected", {"choice": "reject", "by": "ana",
                                                "comment": "boxes too loose"})
    with pytest.raises(StageSkipped, match="ana chose reject: boxes too loose"):
        run_stage("push", pipeline=pipeline, run_id="r1",
                  inputs={"saved_model": model, "decision": rejected})
    assert not (tmp_path / "serving").exists()

    canary_only = _decision(tmp_path, "canary", {"choice": "canary", "by": "ana"})
    pushed = run_stage("push", pipeline=pipeline, run_id="r2",
                       inputs={"saved_model": model, "decision": canary_only})
    assert (pushed.version, pushed.model_extra["label"]) == (1, "canary")
    assert _labels(tmp_path) == {"canary": 1}
    [move] = registry.read(tmp_path / "serving" / "registry.jsonl")
    assert (move["label"], move["by"], move["reason"]) == ("canary", "ana", "ana chose canary")


def test_canary_first_needs_a_running_serving_and_pushes_nothing_without_one(tmp_path):
    pipeline = _pipeline(tmp_path, promote={"canary": True})
    with pytest.raises(ConfigError, match="promote.canary: true needs a running TF Serving.*"
                                          "serving.grpc_address"):
        run_stage("push", pipeline=pipeline, run_id="r1",
                  inputs={"saved_model": str(fake_saved_model(tmp_path / "e", "a"))})
    assert not (tmp_path / "serving").exists()


def test_removing_a_label_stops_serving_its_version_unless_another_label_keeps_it():
    from tensorflow_serving.config import model_server_config_pb2 as pb

    model = pb.ModelConfig(name="shapes")
    model.model_version_policy.specific.versions.extend([1, 2, 3])
    model.version_labels["stable"], model.version_labels["canary"] = 1, 3
    assert serving_config.remove_label(model, "canary") == 3
    assert serving_config.labels(model) == {"stable": 1}
    assert list(model.model_version_policy.specific.versions) == [1, 2]
    model.version_labels["canary"] = 1
    assert serving_config.remove_label(model, "canary") == 1
    assert list(model.model_version_policy.specific.versions) == [1, 2]  # stable keeps it
    assert serving_config.remove_label(model, "canary") is None


# --- through Serving (the stand-in) on the session's real SavedModel -----------------------


@pytest.fixture()
def standin(tmp_path):
    from support.serving_standin import ServingStandin

    with ServingStandin(tmp_path / "serving" / "models.config") as server:
        yield server


def _canary_pipeline(root: Path, standin, **promote):
    # The sample model has trained 60 steps: its scores are low, so every detection counts.
    # The sample's val split is small: the warmups took all of it, the val sample starts
    # at its third image (as if the export had taken two).
    return _pipeline(root, {"grpc_address": standin.grpc_address, "wait_available_s": 120},
                     {"canary": True, "canary_score_threshold": 0.0, "canary_images": 4,
                      **promote}, export={"warmup_images": 2})


def _push_and_check(pipeline, run_id: str, model: Path, records: Path, decision: str):
    pushed = run_stage("push", pipeline=pipeline, run_id=run_id,
                       inputs={"saved_model": str(model), "decision": decision})
    assert pushed.model_extra["label"] == "canary"
    return pushed.version, lambda: run_stage(
        "canary_check", pipeline=pipeline, run_id=run_id,
        inputs={"version": pushed.version, "data": str(records), "decision": decision})


@pytest.mark.slow
def test_a_canary_that_answers_like_stable_becomes_stable(tmp_path, standin, exported_model,
                                                          trained_model):
    from odapi_operators.core.model.saved_model import read_warmup
    from odapi_operators.core.model.tfvision import val_examples

    pipeline = _canary_pipeline(tmp_path, standin, canary_p95_ms=3000)
    records = trained_model["records"]

    first = _decision(tmp_path, "first")  # the first model: nothing to agree with
    version, check = _push_and_check(pipeline, "r1", exported_model, records, first)
    assert _labels(tmp_path) == {"canary": 1}
    checked = check()
    assert (checked.passed, checked.stable) == (True, 1)
    assert checked.model_extra["agreement"] is None and checked.model_extra["notes"]
    assert _labels(tmp_path) == {"stable": 1}

    second = _decision(tmp_path, "second")
    version, check = _push_and_check(pipeline, "r2", exported_model, records, second)
    assert _labels(tmp_path) == {"stable": 1, "canary": 2}
    checked = check()
    verdict = json.loads(Path(second).read_text())["canary"]
    assert verdict["passed"] and verdict["agreement"] == 1.0  # the same model twice
    warmups = len(read_warmup(exported_model / "assets.extra" / "tf_serving_warmup_requests"))
    val_sample = len(val_examples(records, 2 + 4)[2:])
    assert val_sample == 4 and verdict["compared"] == verdict["requests"] == warmups + 4
    assert verdict["stable_before"] == 1 and verdict["stable"] == 2 == checked.stable
    assert _labels(tmp_path) == {"stable": 2}
    assert {("shapes", 1), ("shapes", 2)} <= set(standin.predictions)  # both were asked

    canary_only = _decision(tmp_path, "third", {"choice": "canary", "by": "ana"})
    version, check = _push_and_check(pipeline, "r3", exported_model, records, canary_only)
    assert check().passed and _labels(tmp_path) == {"stable": 2, "canary": 3}  # stays canary

    moves = [(r["label"], r["version"], r["action"])
             for r in registry.read(tmp_path / "serving" / "registry.jsonl")]
    assert moves == [("canary", 1, "promote"), ("stable", 1, "promote"),
                     ("canary", None, "canary_passed"), ("canary", 2, "promote"),
                     ("stable", 2, "promote"), ("canary", None, "canary_passed"),
                     ("canary", 3, "promote")]


@pytest.mark.slow
@pytest.mark.parametrize("fault, setting, why", [
    ("answer_delay_s", {"canary_p95_ms": 300}, "p95 answer time .* above "
                                                "promote.canary_p95_ms 300"),
    ("box_shift", {"canary_p95_ms": 3000}, "agreement with stable .* below "
                                           "promote.canary_min_agreement 0.6")],
    ids=["slow", "misplaced-boxes"])
def test_a_failed_canary_leaves_stable_alone_and_says_why(tmp_path, standin, exported_model,
                                                          trained_model, fault, setting, why):
    from odapi_operators.core.serving.canary import CanaryFailed
    from odapi_operators.core.serving.promote import promote
    from odapi_operators.core.serving.push import push

    promote(tmp_path / "serving", "shapes",
            push(exported_model, tmp_path / "serving", "shapes", "r0")["version"])
    pipeline = _canary_pipeline(tmp_path, standin, **setting)
    decision = _decision(tmp_path, "candidate", {"choice": "stable", "by": "ana"})
    version, check = _push_and_check(pipeline, "r1", exported_model, trained_model["records"],
                                     decision)
    assert (version, _labels(tmp_path), _served(tmp_path)) == (2, {"stable": 1, "canary": 2},
                                                               [1, 2])
    getattr(standin, fault)[2] = 0.35 if fault == "answer_delay_s" else 0.5

    with pytest.raises(CanaryFailed, match=why):
        check()
    assert _labels(tmp_path) == {"stable": 1} and _served(tmp_path) == [1]
    assert serving_config.labels(standin.reloads[-1].model_config_list.config[0]) == {
        "stable": 1}  # Serving was told
    verdict = json.loads(Path(decision).read_text())["canary"]
    assert not verdict["passed"] and verdict["stable"] == 1
    [removed] = [r for r in registry.read(tmp_path / "serving" / "registry.jsonl")
                 if r["action"] == "canary_failed"]
    assert (removed["label"], removed["version"], removed["previous"]) == ("canary", None, 2)
    assert removed["by"] == "ana" and verdict["reason"] in removed["reason"]
