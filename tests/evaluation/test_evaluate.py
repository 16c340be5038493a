"""Evaluation: COCO metrics with per-class AP, split checks, checkpoint == SavedModel."""

from __future__ import annotations

import json

import pytest

from odapi_operators.core.evaluation.coco_metrics import coco_metrics
from odapi_operators.core.evaluation.evaluate import EvaluationError, _check_split

from conftest import odapi

CATEGORIES = [{"id": 1, "name": "circle"}, {"id": 2, "name": "square"},
              {"id": 3, "name": "triangle"}]


def _gt(boxes: list[tuple[int, int, list[float]]]) -> dict:
    images = sorted({image for image, _, _ in boxes})
    return {"images": [{"id": i, "file_name": f"{i}.jpg", "width": 100, "height": 100}
                       for i in images],
            "annotations": [{"id": n, "image_id": i, "category_id": c, "bbox": b,
                             "area": b[2] * b[3], "iscrowd": 0}
                            for n, (i, c, b) in enumerate(boxes, start=1)],
            "categories": CATEGORIES}


GT = _gt([(1, 1, [10, 10, 30, 30]), (1, 2, [50, 50, 40, 40]), (2, 1, [5, 5, 20, 20]),
          (2, 2, [60, 10, 30, 30])])


def _dets(boxes, score=0.9):
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"],
             "score": score} for a in boxes]


def test_perfect_detections_score_one_overall_and_per_class():
    metrics = coco_metrics(GT, _dets(GT["annotations"]))
    assert metrics["AP"] == pytest.approx(1.0) and metrics["AP50"] == pytest.approx(1.0)
    assert metrics["per_class"] == {"circle": pytest.approx(1.0), "square": pytest.approx(1.0),
                                    "triangle": -1.0}  # no ground truth: -1, not 0
    assert metrics["per_class_AP50"]["square"] == pytest.approx(1.0)


def test_a_missed_class_scores_zero_and_pulls_the_mean_down():
    circles = [a for a in GT["annotations"] if a["category_id"] == 1]
    metrics = coco_metrics(GT, _dets(circles))
    assert metrics["per_class"]["circle"] == pytest.approx(1.0)
    assert metrics["per_class"]["square"] == 0.0
    assert metrics["AP"] == pytest.approx(0.5)


def test_loose_boxes_pass_at_iou_50_but_not_75():
    shifted = [{**d, "bbox": [d["bbox"][0] + d["bbox"][2] * 0.2, *d["bbox"][1:]]}
               for d in _dets(GT["annotations"])]  # IoU 0.67
    metrics = coco_metrics(GT, shifted)
    assert metrics["AP50"] == pytest.approx(1.0) and metrics["AP75"] == 0.0


def test_no_detections_at_all_is_zero_not_an_error():
    metrics = coco_metrics(GT, [])
    assert metrics["AP"] == 0.0 and metrics["per_class"]["circle"] == 0.0


def test_split_checks_name_the_problem(capsys):
    with pytest.raises(EvaluationError, match="fewer than the minimum of 5"):
        _check_split(GT, "data", min_images=5, missing_classes="fail")
    with pytest.raises(EvaluationError, match="no box of class.*triangle"):
        _check_split(GT, "data", min_images=1, missing_classes="fail")
    assert _check_split(GT, "data", min_images=1, missing_classes="warn") == ["triangle"]
    assert "triangle" in capsys.readouterr().err


def test_empty_val_split_fails_clearly(tmp_path):
    (tmp_path / "summary.json").write_text(json.dumps(
        {"splits": {"train": {"images": 3}, "val": {"images": 0, "pattern": "x"}},
         "label_map": "x", "num_classes": 1}))
    done = odapi("evaluate", "--model", str(tmp_path), "--data", str(tmp_path), "--out",
                 str(tmp_path / "eval"), check=False)
    assert done.returncode == 5  # refused: a retry would fail the same way
    assert "the val split is empty" in done.stderr


@pytest.mark.slow
def test_checkpoint_and_its_savedmodel_give_the_same_numbers(trained_model, exported_model,
                                                             tmp_path):
    """The gate compares a checkpoint with a SavedModel: the same weights must score the same."""
    results = {}
    for name, model in (("checkpoint", trained_model["model_dir"]),
                        ("saved_model", exported_model)):
        out = tmp_path / name / "metrics.json"
        summary = json.loads(odapi("evaluate", "--model", str(model), "--data",
                                   str(trained_model["records"]), "--out", str(out.parent),
                                   "--missing-classes", "warn").stdout.splitlines()[-1])
        assert summary["model_kind"] == name and summary["eval_images"] > 0
        results[name] = (json.loads(out.read_text()),
                         json.loads((out.parent / "detections.json").read_text()))
    (ckpt, ckpt_dets), (saved, saved_dets) = results["checkpoint"], results["saved_model"]
    assert len(ckpt_dets) == len(saved_dets) > 0  # no score threshold: real detections
    for a, b in zip(ckpt_dets, saved_dets):
        assert (a["image_id"], a["category_id"]) == (b["image_id"], b["category_id"])
        assert a["bbox"] == pytest.approx(b["bbox"], abs=1e-2)  # pixels
        assert a["score"] == pytest.approx(b["score"], abs=1e-4)
    for key in ("AP", "AP50", "AP75", "ARmax100"):
        assert ckpt[key] == pytest.approx(saved[key], abs=1e-6), key
    assert ckpt["per_class"] == pytest.approx(saved["per_class"], abs=1e-6)
    assert set(ckpt["per_class"]) == {"circle", "square", "triangle"}
