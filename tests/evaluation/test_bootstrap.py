"""Paired bootstrap of COCO AP: pycocotools' numbers at weight 1, intervals on known cases."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from odapi_operators.core.evaluation.bootstrap import (
    matches_from,
    paired_intervals,
    read_matches,
    resample_weights,
    resampled_metrics,
    write_matches,
)
from odapi_operators.core.evaluation.coco_metrics import coco_eval

from support.detections import detections, ground_truth

METRICS = ("AP", "AP50", "AP75")


@pytest.fixture(scope="module")
def case() -> tuple[dict, list[dict]]:
    """80 images, crowd boxes, a class without ground truth, duplicates, ties, hallucinations."""
    gt = ground_truth(80, seed=0)
    return gt, detections(gt, seed=1)


def _stats(evaluator) -> dict[str, float]:
    return dict(zip(("AP", "AP50", "AP75"), evaluator.stats[:3]))


def test_every_weight_one_reproduces_pycocotools(case):
    gt, found = case
    evaluator = coco_eval(gt, found)
    matches = matches_from(evaluator)
    assert matches.det_ignore.any() and 0 in matches.gt_count.sum(axis=0)  # crowd; no-truth
    ours = resampled_metrics(matches, np.ones((1, len(matches.image_ids))), METRICS)
    for metric, value in _stats(evaluator).items():
        assert 0.1 < value < 0.9
        assert ours[metric][0] == pytest.approx(value, abs=1e-6), metric


def test_a_subset_reproduces_pycocotools_on_those_images(case):
    gt, found = case
    subset = [i for i in range(1, 81) if i % 3]
    ours = resampled_metrics(matches_from(coco_eval(gt, found)).subset(subset),
                             np.ones((1, len(subset))), METRICS)
    for metric, value in _stats(coco_eval(gt, found, subset)).items():
        assert ours[metric][0] == pytest.approx(value, abs=1e-6), metric


def test_a_weight_of_k_is_the_image_drawn_k_times(case):
    """The resample's AP equals pycocotools on a dataset holding k renamed copies of each
    image: the weighted counts are the multiset, not an approximation of it."""
    gt, found = case
    weights = resample_weights(len(gt["images"]), 1, seed=5)[0]
    copies = {"images": [], "annotations": [], "categories": gt["categories"]}
    copied: list[dict] = []
    for image in gt["images"]:
        for _ in range(weights[image["id"] - 1]):
            new_id = len(copies["images"]) + 1
            copies["images"].append({**image, "id": new_id})
            copies["annotations"] += [{**a, "id": len(copies["annotations"]) + 1 + n,
                                       "image_id": new_id}
                                      for n, a in enumerate(a for a in gt["annotations"]
                                                            if a["image_id"] == image["id"])]
            copied += [{**d, "image_id": new_id} for d in found if d["image_id"] == image["id"]]
    ours = resampled_metrics(matches_from(coco_eval(gt, found)), weights[None, :], METRICS)
    for metric, value in _stats(coco_eval(copies, copied)).items():
        assert ours[metric][0] == pytest.approx(value, abs=1e-6), metric


def test_no_detections_is_zero_and_a_resample_without_truth_is_nan():
    gt = ground_truth(5, seed=2, crowd=0.0)
    matches = matches_from(coco_eval(gt, []))
    weights = np.vstack([np.ones(5), np.zeros(5)])
    assert resampled_metrics(matches, weights, ["AP50"])["AP50"][0] == 0.0
    assert np.isnan(resampled_metrics(matches, weights, ["AP50"])["AP50"][1])
    with pytest.raises(ValueError, match="not \\['ARmax100'\\]"):
        resampled_metrics(matches, weights, ["ARmax100"])


def test_identical_models_have_a_zero_delta_and_a_narrow_interval(case):
    gt, found = case
    matches = matches_from(coco_eval(gt, found))
    for interval in paired_intervals(matches, matches, matches.image_ids, METRICS).values():
        assert interval.delta == 0.0 and interval.low <= 0.0 <= interval.high
        assert interval.high - interval.low < 1e-9
        assert interval.resamples == 1000 and interval.images == 80


def test_two_equally_good_models_overlap_zero_and_a_better_one_does_not(case):
    gt, _ = case
    a = matches_from(coco_eval(gt, detections(gt, seed=11)))
    b = matches_from(coco_eval(gt, detections(gt, seed=12)))
    same = paired_intervals(a, b, a.image_ids, ["AP50"], seed=3)["AP50"]
    assert same.low < 0 < same.high and same.high - same.low < 0.2
    worse = matches_from(coco_eval(gt, detections(gt, seed=13, recall=0.4)))
    better = paired_intervals(a, worse, a.image_ids, ["AP50"], seed=3)["AP50"]
    assert better.delta > 0.2 and better.low > 0.1
    assert better.delta == pytest.approx(same.candidate - better.production)


def test_resamples_are_seeded_and_paired():
    first, again = resample_weights(40, 1000, 7), resample_weights(40, 1000, 7)
    assert np.array_equal(first, again) and not np.array_equal(first, resample_weights(40, 1000, 8))
    assert first.shape == (1000, 40) and (first.sum(axis=1) == 40).all()


def test_intervals_refuse_images_one_side_was_not_evaluated_on(case):
    gt, found = case
    everything = matches_from(coco_eval(gt, found))
    fewer = everything.subset(range(1, 41))
    with pytest.raises(ValueError, match="production was not evaluated on image"):
        paired_intervals(everything, fewer, everything.image_ids, ["AP50"])


def test_matches_round_trip_through_npz(case, tmp_path):
    gt, found = case
    matches = replace(matches_from(coco_eval(gt, found)),
                      slices={"new": np.array([1, 2]), "old": np.array([], np.int64)})
    write_matches(tmp_path / "matches.npz", matches)
    back = read_matches(tmp_path / "matches.npz")
    for name in ("image_ids", "gt_count", "det_score", "det_match", "det_ignore"):
        assert np.array_equal(getattr(back, name), getattr(matches, name))
    assert back.slices["new"].tolist() == [1, 2] and back.slices["old"].size == 0
