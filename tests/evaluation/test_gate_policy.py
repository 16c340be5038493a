"""gate: the policy model and the promotion truth table, through decision.json."""

from __future__ import annotations

import json

import pytest
import yaml
from pydantic import ValidationError

from odapi_operators.core.evaluation.gate import (
    Baseline,
    Force,
    GateError,
    GatePolicy,
    decide,
    gate,
)

PRODUCTION = {"AP": 0.50, "AP50": 0.70, "total_loss": 0.80, "eval_images": 40,
              "per_class": {"circle": 0.60, "square": 0.40, "rare": -1.0}}


def cand(**changes) -> dict:
    metrics = json.loads(json.dumps(PRODUCTION))
    per_class = changes.pop("per_class", None)
    metrics.update(changes)
    if per_class:
        metrics["per_class"].update(per_class)
    return metrics


def prod(metrics: dict | None = None, version: int | None = 3) -> Baseline:
    return Baseline(version=version, metrics=PRODUCTION if metrics is None else metrics)


NO_WORSE = GatePolicy(bounds={"AP50": {"min": 0.5}}, vs_production={"AP": {}})


def verdicts(decision: dict) -> dict[str, str]:
    return {c["check"]: c["verdict"] for c in decision["checks"]}


# --- truth table -------------------------------------------------------------------------


@pytest.mark.parametrize("metrics,baseline,policy,promoted,rule", [
    (cand(AP=0.10), Baseline(), NO_WORSE, True, "first_model"),
    (cand(AP50=0.40), Baseline(), NO_WORSE, False, "checks"),  # bounds still apply
    (cand(AP=0.55), prod(), NO_WORSE, True, "checks"),
    (cand(AP=0.45), prod(), NO_WORSE, False, "checks"),
    (cand(), prod(), NO_WORSE, True, "checks"),  # equal is "no worse"
    (cand(), prod(), GatePolicy(vs_production={"AP": {"min_delta": 0.01}}), False, "checks"),
    (cand(AP=0.99), prod(), GatePolicy(), False, "no_thresholds"),
    (cand(AP=0.99), Baseline(), GatePolicy(min_eval_images=1), False, "no_thresholds"),
], ids=["first-model", "first-model-below-bound", "better", "worse", "equal",
        "equal-needs-gain", "no-thresholds", "no-thresholds-first-model"])
def test_truth_table(metrics, baseline, policy, promoted, rule):
    decision = decide(metrics, policy, baseline)
    assert (decision["promoted"], decision["rule"]) == (promoted, rule)
    assert decision["first_model"] is (baseline.version is None)
    assert decision["forced"] is False


def test_first_model_change_checks_pass_by_rule_and_say_so():
    decision = decide(cand(), NO_WORSE, Baseline())
    [change] = [c for c in decision["checks"] if c["kind"] == "vs_production"]
    assert change["verdict"] == "skipped" and "first model" in change["note"]
    assert "promoted by rule" in decision["reason"]
    assert decision["baseline"] == {"version": None, "metrics": None}


def test_worse_reason_names_metric_value_and_production():
    decision = decide(cand(AP=0.45), NO_WORSE, prod())
    assert "vs_production:AP 0.45 vs production 0.5" in decision["reason"]
    check = next(c for c in decision["checks"] if c["kind"] == "vs_production")
    assert check["improvement"] == pytest.approx(-0.05) and check["passed"] is False


def test_float_noise_does_not_flip_a_verdict():
    policy = GatePolicy(vs_production={"AP": {"min_delta": 0.1}})
    assert decide(cand(AP=0.6), policy, prod(cand(AP=0.5)))["promoted"] is True  # 0.0999...


def test_baseline_version_without_metrics_fails_closed():
    decision = decide(cand(AP=0.9), NO_WORSE, Baseline(version=3))
    assert decision["promoted"] is False
    assert "baseline value missing" in decision["reason"]


def test_baseline_on_another_split_is_refused():
    decision = decide(cand(AP=0.9), NO_WORSE, prod(cand(eval_images=41)))
    assert decision["promoted"] is False
    assert verdicts(decision)["same_split:eval_images"] == "fail"


# --- per class ---------------------------------------------------------------------------


@pytest.mark.parametrize("per_class,promoted,failing", [
    ({"square": 0.36}, True, []),  # drop 0.04 <= 0.05
    ({"square": 0.30}, False, ["per_class:square"]),
    ({"circle": 0.95, "square": 0.30}, False, ["per_class:square"]),  # mean up, one class down
    ({"square": -1.0}, False, ["per_class:square"]),  # a class production detects vanished
], ids=["within-tolerance", "regressed", "hidden-by-average", "vanished"])
def test_per_class_regression(per_class, promoted, failing):
    policy = GatePolicy(vs_production={"AP": {"min_delta": -1}}, per_class_max_drop=0.05)
    decision = decide(cand(per_class=per_class), policy, prod())
    assert decision["promoted"] is promoted
    assert [c["check"] for c in decision["checks"] if c["verdict"] == "fail"] == failing
    assert verdicts(decision)["per_class:rare"] == "skipped"  # no baseline AP for it


def test_per_class_needs_per_class_metrics():
    policy = GatePolicy(per_class_max_drop=0.05)
    metrics = {k: v for k, v in cand().items() if k != "per_class"}
    decision = decide(metrics, policy, prod())
    assert decision["promoted"] is False and "no per_class AP" in decision["reason"]


# --- directions, relative thresholds, eval images ------------------------------------------


@pytest.mark.parametrize("loss,promoted", [(0.70, True), (0.80, True), (0.90, False)])
def test_loss_is_lower_is_better(loss, promoted):
    policy = GatePolicy(bounds={"total_loss": {"max": 1.0}}, vs_production={"total_loss": {}})
    decision = decide(cand(total_loss=loss), policy, prod())
    assert decision["promoted"] is promoted
    check = next(c for c in decision["checks"] if c["kind"] == "vs_production")
    assert check["higher_is_better"] is False


def test_explicit_direction_overrides_the_name():
    policy = GatePolicy(vs_production={"latency_ms": {"higher_is_better": False}})
    assert decide({"latency_ms": 9.0}, policy, prod({"latency_ms": 10.0}))["promoted"] is True
    assert decide({"latency_ms": 11.0}, policy, prod({"latency_ms": 10.0}))["promoted"] is False


def test_loss_above_absolute_max_fails():
    policy = GatePolicy(bounds={"total_loss": {"max": 1.0}})
    decision = decide(cand(total_loss=1.2), policy, prod())
    assert decision["reason"] == "total_loss 1.2 not <= 1.0"


@pytest.mark.parametrize("ap,min_delta,promoted", [
    (0.52, 0.05, False),  # +4 % < +5 %
    (0.53, 0.05, True),  # +6 %
    (0.495, -0.02, True),  # -1 % tolerated
    (0.48, -0.02, False),  # -4 %
])
def test_relative_threshold(ap, min_delta, promoted):
    policy = GatePolicy(vs_production={"AP": {"min_delta": min_delta, "relative": True}})
    assert decide(cand(AP=ap), policy, prod())["promoted"] is promoted


def test_relative_against_zero_baseline():
    policy = GatePolicy(vs_production={"AP": {"min_delta": 0.1, "relative": True}})
    assert decide(cand(AP=0.1), policy, prod(cand(AP=0.0)))["promoted"] is True
    assert decide(cand(AP=0.0), policy, prod(cand(AP=0.0)))["promoted"] is False


@pytest.mark.parametrize("images,promoted", [(40, True), (39, False), (None, False)])
def test_min_eval_images(images, promoted):
    metrics = cand(eval_images=images)
    policy = GatePolicy(min_ap50=0.5, min_eval_images=40)
    decision = decide(metrics, policy, prod(cand(eval_images=images)))
    assert decision["promoted"] is promoted
    assert verdicts(decision)["eval_images:eval_images"] == ("pass" if promoted else "fail")


@pytest.mark.parametrize("value", [None, float("nan"), "0.9"])
def test_unusable_metric_values_fail(value):
    assert decide(cand(AP50=value), GatePolicy(min_ap50=0.5), prod())["promoted"] is False


# --- forced ------------------------------------------------------------------------------


def test_forced_with_reason_promotes_and_keeps_the_real_verdicts():
    decision = decide(cand(AP=0.1), NO_WORSE, prod(), Force(reason="hotfix #12", by="ana"))
    assert decision["promoted"] is True and decision["rule"] == "forced"
    assert decision["force"] == {"reason": "hotfix #12", "by": "ana"}
    assert verdicts(decision)["vs_production:AP"] == "fail"
    assert "hotfix #12" in decision["reason"] and "vs_production:AP" in decision["reason"]


def test_force_model_requires_a_reason():
    with pytest.raises(ValidationError, match="reason"):
        Force(reason="  ")


# --- policy config -------------------------------------------------------------------------

EXAMPLE = """
min_ap50: 0.5
bounds:
  AP50: {min: 0.5}
  total_loss: {max: 1.0}
vs_production:
  AP: {min_delta: 0.0}
  AP50: {min_delta: -0.02, relative: true}
  total_loss: {min_delta: 0.0, higher_is_better: false}
per_class_max_drop: 0.05
min_eval_images: 20
"""


def test_yaml_example_parses():
    policy = GatePolicy.model_validate(yaml.safe_load(EXAMPLE))
    assert policy.has_thresholds()
    assert set(policy.effective_bounds()) == {"AP50", "total_loss"}
    assert GatePolicy.model_validate(policy.model_dump()) == policy


def test_legacy_min_ap50_form_and_precedence():
    assert GatePolicy.model_validate({"min_ap50": 0.5}).effective_bounds()["AP50"].min == 0.5
    both = GatePolicy(min_ap50=0.6, bounds={"AP50": {"min": 0.4, "max": 0.99}})
    assert both.effective_bounds()["AP50"].model_dump() == {"min": 0.6, "max": 0.99}
    assert not GatePolicy().has_thresholds()
    assert not GatePolicy(min_eval_images=10).has_thresholds()


@pytest.mark.parametrize("data,key", [
    ({"bounds": {"AP50": {}}}, "bounds.AP50"),
    ({"bounds": {"AP50": {"min": 0.9, "max": 0.1}}}, "bounds.AP50"),
    ({"bounds": {"AP50": {"minimum": 0.5}}}, "bounds.AP50.minimum"),
    ({"vs_production": {"AP": {"min_delta": 0, "direction": "up"}}}, "vs_production.AP.direction"),
    ({"per_class_max_drop": -0.1}, "per_class_max_drop"),
    ({"min_eval_images": 0}, "min_eval_images"),
    ({"min_ap50": 1.5}, "min_ap50"),
    ({"treshold": 1}, "treshold"),
    ({"bounds": {"per_class": {"min": 0.1}}}, "bounds"),
])
def test_invalid_policy_names_the_key(data, key):
    with pytest.raises(ValidationError) as info:
        GatePolicy.model_validate(data)
    locs = {".".join(str(p) for p in e["loc"]) for e in info.value.errors()}
    assert key in locs


# --- decision.json -------------------------------------------------------------------------


def _files(tmp_path, candidate: dict, baseline: dict | None = None):
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps(candidate))
    base = None
    if baseline is not None:
        base = tmp_path / "baseline-metrics.json"
        base.write_text(json.dumps(baseline))
    return metrics, base


def test_decision_json_records_everything(tmp_path):
    metrics, base = _files(tmp_path, cand(AP=0.45), PRODUCTION)
    result = gate(metrics, tmp_path / "gate", NO_WORSE, baseline_version=3,
                  baseline_metrics=base, dataset_version="fp-123")
    written = json.loads((tmp_path / "gate" / "decision.json").read_text())
    assert result["decision"] == str(tmp_path / "gate" / "decision.json")
    assert written["promoted"] is False and written["rule"] == "checks"
    assert written["baseline"] == {"version": 3, "metrics": str(base)}
    assert written["dataset_version"] == "fp-123"
    assert written["metrics"] == str(metrics)
    assert written["forced"] is False and written["force"] is None
    assert written["policy"] == {"bounds": {"AP50": {"min": 0.5}},
                                 "vs_production": {"AP": {}}}
    for check in written["checks"]:
        assert {"check", "metric", "op", "bound", "value", "verdict", "passed"} <= set(check)
    assert {c["check"]: (c["value"], c["bound"], c["verdict"]) for c in written["checks"]} == {
        "same_split:eval_images": (40, 40, "pass"),
        "AP50 >= 0.5": (0.7, 0.5, "pass"),
        "vs_production:AP": (0.45, 0.0, "fail"),
        # the default forgetting guard: metrics without slices (no dataset diff) skip it
        "slice:old:AP50": (None, -0.01, "skipped")}


def test_no_thresholds_still_writes_decision(tmp_path):
    metrics, _ = _files(tmp_path, cand(AP=0.99))
    gate(metrics, tmp_path / "gate", GatePolicy())
    written = json.loads((tmp_path / "gate" / "decision.json").read_text())
    assert written["promoted"] is False and written["rule"] == "no_thresholds"


def test_forced_gate_records_who_and_why(tmp_path):
    metrics, base = _files(tmp_path, cand(AP=0.1), PRODUCTION)
    result = gate(metrics, tmp_path / "gate", NO_WORSE, baseline_version=3,
                  baseline_metrics=base, force=True, force_reason="rollback of a bad label",
                  forced_by="ana")
    assert result["promoted"] is True and result["rule"] == "forced"
    written = json.loads((tmp_path / "gate" / "decision.json").read_text())
    assert written["force"] == {"reason": "rollback of a bad label", "by": "ana"}


@pytest.mark.parametrize("reason", [None, "", "   "])
def test_force_without_reason_is_refused_loudly_and_recorded(tmp_path, reason):
    metrics, _ = _files(tmp_path, cand(AP=0.9))
    with pytest.raises(GateError, match="no reason") as info:
        gate(metrics, tmp_path / "gate", NO_WORSE, force=True, force_reason=reason,
             forced_by="bob")
    assert str(tmp_path / "gate" / "decision.json") in str(info.value)
    written = json.loads((tmp_path / "gate" / "decision.json").read_text())
    assert written["promoted"] is False and written["rule"] == "force_refused"
    assert written["force"] == {"reason": None, "by": "bob"}


def test_a_reason_without_force_forces_nothing(tmp_path):
    metrics, _ = _files(tmp_path, cand(AP50=0.1))
    result = gate(metrics, tmp_path / "gate", NO_WORSE, force_reason="", forced_by="bob")
    assert result["promoted"] is False and result["force"] is None


def test_dataset_version_falls_back_to_metrics(tmp_path):
    metrics, _ = _files(tmp_path, cand(dataset_version="fp-9"))
    assert gate(metrics, tmp_path / "g", {"min_ap50": 0.5})["dataset_version"] == "fp-9"
