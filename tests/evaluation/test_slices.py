"""Slices from a dataset diff, and a gate that refuses a candidate that forgot the old images.

Synthetic ground truth and detections go through the evaluator's own scoring (`score`: COCO
metrics per slice, matches.npz) and the real gate, so decision.json is what a run writes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from pydantic import ValidationError

from odapi_operators.core.evaluation.bootstrap import read_matches
from odapi_operators.core.evaluation.evaluate import score
from odapi_operators.core.evaluation.gate import DEFAULT_SLICE_CHECKS, GatePolicy, gate
from odapi_operators.core.evaluation.report import slices_section
from odapi_operators.core.evaluation.slices import SliceError, image_keys, read_diff, slice_images
from odapi_operators.core.model.detector import Detections

from support.detections import detections, ground_truth, perfect

IMAGES = 80
NEW = set(range(1, 41))  # 1-30 added, 31-40 re-labelled in this version
OLD = set(range(41, IMAGES + 1))
FORGETTING = {"slices": [{"slice": "new", "metric": "AP50", "min_delta": 0.0, "use_interval": True},
                         {"slice": "old", "metric": "AP50", "min_delta": -0.01}]}


def key(image_id: int) -> str:
    return f"sha-{image_id:04d}"


@pytest.fixture(scope="module")
def gt() -> dict:
    return ground_truth(IMAGES, seed=4, crowd=0.0)


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> Path:
    """A records folder's source_ids.json: COCO image id -> image key (ids are 1-based
    manifest positions, keys content hashes)."""
    folder = tmp_path_factory.mktemp("records")
    (folder / "source_ids.json").write_text(json.dumps(
        {str(i): {"key": key(i), "split": "val", "source_id": f"export-{i}"}
         for i in range(1, IMAGES + 1)}))
    return folder


def write_diff(folder: Path, parent: str | None, added=(), changed=(), removed=()) -> Path:
    path = folder / "diff.json"
    path.write_text(json.dumps({"parent": parent, "added": list(added),
                                "changed": list(changed), "removed": list(removed),
                                "boxes": {}}))
    return path


@pytest.fixture(scope="module")
def diff(tmp_path_factory) -> Path:
    return write_diff(tmp_path_factory.mktemp("version"), "fp-parent",
                      added=[key(i) for i in range(1, 31)] + ["sha-train-only"],
                      changed=[key(i) for i in range(31, 41)], removed=["sha-gone"])


def evaluate(folder: Path, gt: dict, found: list[dict], slices: dict, diff=None) -> Path:
    """What the evaluate stage writes after inference, from given detections."""
    folder.mkdir(parents=True, exist_ok=True)
    metrics = score(gt, found, folder / "metrics.json", slices, diff=diff)
    (folder / "metrics.json").write_text(json.dumps(metrics))
    return folder / "metrics.json"


def sliced(gt: dict, records: Path, diff: Path | None) -> dict[str, list[int]]:
    return slice_images([i["id"] for i in gt["images"]], image_keys(records),
                        read_diff(diff) if diff else None)


# --- slices ------------------------------------------------------------------------------


def test_slices_come_from_the_diff_through_source_ids(gt, records, diff):
    slices = sliced(gt, records, diff)
    assert slices["all"] == list(range(1, IMAGES + 1))
    assert set(slices["new"]) == NEW and set(slices["old"]) == OLD


def test_metrics_json_keeps_the_overall_numbers_and_adds_every_slice(gt, records, diff,
                                                                     tmp_path):
    found = detections(gt, seed=1)
    path = evaluate(tmp_path / "eval", gt, found, sliced(gt, records, diff), diff)
    metrics = json.loads(path.read_text())
    assert set(metrics["slices"]) == {"all", "new", "old"}
    assert {n: s["images"] for n, s in metrics["slices"].items()} == {"all": 80, "new": 40,
                                                                      "old": 40}
    for k in ("AP", "AP50", "AP75", "ARmax100", "per_class", "per_class_AP50"):
        assert metrics[k] == metrics["slices"]["all"][k]  # readers of the top level keep working
    assert metrics["eval_images"] == 80 and metrics["diff"] == str(diff)
    assert metrics["slices"]["new"]["AP50"] != metrics["slices"]["old"]["AP50"]
    assert set(metrics["slices"]["old"]["per_class"]) == {"circle", "square", "triangle",
                                                          "never_seen"}
    assert sum(metrics["slices"][n]["boxes"] for n in ("new", "old")) == metrics["eval_boxes"]
    matches = read_matches(tmp_path / "eval" / metrics["matches"])
    assert set(matches.slices["old"].tolist()) == OLD and len(matches.image_ids) == 80


def test_first_version_has_everything_new_and_an_empty_old_slice(gt, records, tmp_path):
    first = write_diff(tmp_path, None, added=[key(i) for i in range(1, IMAGES + 1)])
    slices = sliced(gt, records, first)
    assert slices["new"] == slices["all"] and slices["old"] == []
    metrics = json.loads(evaluate(tmp_path / "eval", gt, perfect(gt), slices, first).read_text())
    old = metrics["slices"]["old"]
    assert old["images"] == 0 and old["AP50"] is None and "no val image" in old["note"]


def test_without_a_diff_there_is_only_the_all_slice(gt, tmp_path):
    slices = slice_images([i["id"] for i in gt["images"]], None, None)
    assert list(slices) == ["all"]
    metrics = json.loads(evaluate(tmp_path / "eval", gt, perfect(gt), slices).read_text())
    assert list(metrics["slices"]) == ["all"] and metrics["diff"] is None


def test_slicing_problems_name_the_file(gt, records, diff, tmp_path):
    with pytest.raises(SliceError, match="source_ids.json is missing"):
        image_keys(tmp_path)
    with pytest.raises(SliceError, match=r"val image id\(s\) \[80\]"):
        slice_images([i["id"] for i in gt["images"]], {i: key(i) for i in range(1, 80)},
                     read_diff(diff))
    (tmp_path / "bad.json").write_text(json.dumps({"added": []}))
    with pytest.raises(SliceError, match="bad.json: not a dataset diff"):
        read_diff(tmp_path / "bad.json")
    (tmp_path / "bad.json").write_text(json.dumps({"parent": None, "added": "sha-1"}))
    with pytest.raises(SliceError, match="`added` must be a list"):
        read_diff(tmp_path / "bad.json")


# --- the gate --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def forgetful(gt, records, diff, tmp_path_factory) -> dict[str, Path]:
    """Production is decent everywhere; the candidate is perfect on the new images and has
    forgotten most of the old ones."""
    root = tmp_path_factory.mktemp("forgetful")
    slices = sliced(gt, records, diff)
    production = evaluate(root / "production", gt, detections(gt, seed=1, recall=0.8), slices,
                          diff)
    candidate = evaluate(root / "candidate", gt, perfect(gt, NEW) + detections(
        gt, seed=2, recall=0.25, image_ids=OLD), slices, diff)
    return {"root": root, "candidate": candidate, "production": production}


def test_a_forgetful_candidate_passes_new_and_is_refused_on_old(forgetful):
    result = gate(forgetful["candidate"], forgetful["root"] / "gate", FORGETTING,
                  baseline_version=4, baseline_metrics=forgetful["production"])
    written = json.loads((forgetful["root"] / "gate" / "decision.json").read_text())
    assert result["promoted"] is False and written["rule"] == "checks"
    checks = {c["check"]: c for c in written["checks"]}
    new, old = checks["slice:new:AP50"], checks["slice:old:AP50"]
    for check in (new, old):
        assert {"slice", "metric", "candidate", "production", "delta", "interval", "images",
                "verdict"} <= set(check)
        low, high = check["interval"]
        assert low <= check["delta"] <= high and check["images"] == 40
        assert check["delta"] == pytest.approx(check["candidate"] - check["production"])
    assert new["verdict"] == "pass" and new["candidate"] == pytest.approx(1.0)
    assert new["value"] == new["interval"][0] > 0  # the lower bound is what was tested
    assert old["verdict"] == "fail" and old["delta"] < -0.3 and old["value"] == old["delta"]
    assert "AP50 on slice old (40 images)" in written["reason"]
    assert "slice:new" not in written["reason"]
    assert set(written["slices"]) == {"all", "new", "old"}
    assert written["slices"]["all"]["AP50"]["delta"] > -0.01  # all images alone would promote
    assert written["slices"]["old"]["AP50"]["interval"] == old["interval"]
    assert written["slices"]["all"]["AP"]["interval"] is not None


def test_identical_models_pass_even_an_interval_check(forgetful, tmp_path):
    policy = {"slices": [{"slice": s, "metric": m, "min_delta": -0.001, "use_interval": True}
                         for s in ("all", "new", "old") for m in ("AP", "AP50")]}
    result = gate(forgetful["production"], tmp_path, policy, baseline_version=4,
                  baseline_metrics=forgetful["production"])
    assert result["promoted"] is True
    for check in (c for c in result["checks"] if c["kind"] == "slice"):
        assert check["delta"] == 0.0 and check["interval"] == [0.0, 0.0]


def test_an_empty_old_slice_passes_with_a_note(gt, records, tmp_path):
    first = write_diff(tmp_path, None, added=[key(i) for i in range(1, IMAGES + 1)])
    slices = sliced(gt, records, first)
    candidate = evaluate(tmp_path / "c", gt, perfect(gt), slices, first)
    production = evaluate(tmp_path / "p", gt, detections(gt, seed=1), slices, first)
    result = gate(candidate, tmp_path / "gate", {**FORGETTING, "min_ap50": 0.5},
                  baseline_version=1, baseline_metrics=production)
    old = next(c for c in result["checks"] if c["check"] == "slice:old:AP50")
    assert old["verdict"] == "skipped" and old["passed"] and old["images"] == 0
    assert "no val image in slice `old`" in old["note"]
    assert result["promoted"] is True and result["slices"]["old"]["images"] == 0


def test_first_model_and_missing_slices_skip_with_a_reason(forgetful, gt, tmp_path):
    first = gate(forgetful["candidate"], tmp_path / "a", {**FORGETTING, "min_ap50": 0.1})
    assert first["rule"] == "first_model"
    assert all(c["verdict"] == "skipped" and "first model" in c["note"]
               for c in first["checks"] if c["kind"] == "slice")
    plain = evaluate(tmp_path / "plain", gt, perfect(gt), {"all": [i["id"] for i in gt["images"]]})
    result = gate(plain, tmp_path / "b", {**FORGETTING, "min_ap50": 0.1}, baseline_version=4,
                  baseline_metrics=forgetful["production"])
    old = next(c for c in result["checks"] if c["check"] == "slice:old:AP50")
    assert old["verdict"] == "skipped" and "without a dataset diff" in old["note"]


def test_an_interval_check_without_matches_fails_closed(forgetful, tmp_path):
    (tmp_path / "p").mkdir()  # production's metrics.json without its matches.npz
    (tmp_path / "p" / "metrics.json").write_text(forgetful["production"].read_text())
    result = gate(forgetful["candidate"], tmp_path / "gate", FORGETTING, baseline_version=4,
                  baseline_metrics=tmp_path / "p" / "metrics.json")
    new = next(c for c in result["checks"] if c["check"] == "slice:new:AP50")
    assert new["verdict"] == "fail" and "matches missing for production" in new["note"]
    old = next(c for c in result["checks"] if c["check"] == "slice:old:AP50")
    assert old["verdict"] == "fail" and old["interval"] is None  # the point delta still counts


# --- policy ----------------------------------------------------------------------------------


def test_slice_policy_parses_with_defaults_and_names_bad_keys():
    policy = GatePolicy.model_validate(yaml.safe_load("""
slices:
  - {slice: old, metric: AP50, min_delta: -0.01}
  - {slice: new, metric: AP, min_delta: 0.0, use_interval: true}
bootstrap: {resamples: 2000, confidence: 0.9, seed: 3}
"""))
    assert policy.has_thresholds() and policy.slices[1].use_interval
    assert GatePolicy().slices == list(DEFAULT_SLICE_CHECKS)
    assert not GatePolicy().has_thresholds()  # the default guard does not ask for promotion
    assert GatePolicy().bootstrap.model_dump() == {"resamples": 1000, "confidence": 0.95,
                                                   "seed": 0}
    for data, loc in (({"slices": [{"slice": "older"}]}, "slices.0.slice"),
                      ({"slices": [{"slice": "old", "metric": "ARmax100"}]}, "slices.0.metric"),
                      ({"bootstrap": {"resamples": 100}}, "bootstrap.resamples"),
                      ({"bootstrap": {"confidence": 1.0}}, "bootstrap.confidence")):
        with pytest.raises(ValidationError) as info:
            GatePolicy.model_validate(data)
        assert loc in {".".join(str(p) for p in e["loc"]) for e in info.value.errors()}


# --- report ----------------------------------------------------------------------------------


def test_report_shows_slices_side_by_side_with_interval_whiskers(forgetful, tmp_path):
    from PIL import Image

    decision = gate(forgetful["candidate"], tmp_path / "gate", FORGETTING, baseline_version=4,
                    baseline_metrics=forgetful["production"])
    candidate = json.loads(forgetful["candidate"].read_text())
    production = json.loads(forgetful["production"].read_text())
    html = slices_section(candidate, production, decision, tmp_path)
    for name in ("all", "new", "old"):
        interval = decision["slices"][name]["AP50"]["interval"]
        assert f"[{interval[0]:+.3f}, {interval[1]:+.3f}]" in html
    assert "<th>95% interval</th>" in html and 'src="slices.png"' in html
    with Image.open(tmp_path / "slices.png") as image:
        pixels = np.asarray(image.convert("RGB"))
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 10
    alone = slices_section(candidate, None, None, tmp_path)
    assert "no production model" in alone and "—" in alone


# --- the evaluate stage on real records --------------------------------------------------------


class TruthDetector:
    """Stands in for a model: detects exactly the record's boxes (no TensorFlow model)."""

    kind, path = "stand-in", "truth"

    def detect(self, example: bytes) -> Detections:
        import tensorflow as tf

        f = tf.train.Example.FromString(example).features.feature
        boxes = np.stack([f[f"image/object/bbox/{k}"].float_list.value
                          for k in ("ymin", "xmin", "ymax", "xmax")], axis=1)
        labels = np.asarray(f["image/object/class/label"].int64_list.value)
        return Detections(boxes, np.full(len(labels), 0.9), labels)


def test_evaluate_stage_slices_real_records_by_the_diff(tmp_path, monkeypatch):
    from odapi_operators.core.evaluation.evaluate import evaluate as evaluate_model
    from odapi_operators.core.model import detector

    from conftest import prepare_records

    records = prepare_records(tmp_path, count=12)
    val = {int(i): e["key"] for i, e in json.loads((records / "source_ids.json").read_text())
           .items() if e["split"] == "val"}
    fresh = sorted(val)[: len(val) // 2]
    diff_file = write_diff(tmp_path, "fp-parent", changed=[val[i] for i in fresh])
    monkeypatch.setattr(detector, "load_detector", lambda model: TruthDetector())
    summary = evaluate_model("truth", records, tmp_path / "eval" / "metrics.json",
                             missing_classes="warn", diff=diff_file)
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert summary["metrics"] == str(tmp_path / "eval" / "metrics.json")
    assert metrics["AP50"] == pytest.approx(1.0) and metrics["eval_images"] == len(val)
    assert metrics["slices"]["new"]["images"] == len(fresh)
    assert metrics["slices"]["old"]["images"] == len(val) - len(fresh)
    matches = read_matches(tmp_path / "eval" / "matches.npz")
    assert matches.slices["new"].tolist() == fresh
    assert metrics["model"] == "truth" and metrics["model_kind"] == "stand-in"


def test_unreadable_matches_fail_an_interval_check_closed(forgetful, tmp_path):
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "metrics.json").write_text(forgetful["production"].read_text())
    (tmp_path / "p" / "matches.npz").write_bytes(b"not a zip")
    result = gate(forgetful["candidate"], tmp_path / "gate", FORGETTING, baseline_version=4,
                  baseline_metrics=tmp_path / "p" / "metrics.json")
    new = next(c for c in result["checks"] if c["check"] == "slice:new:AP50")
    assert new["verdict"] == "fail" and "matches missing for production" in new["note"]
