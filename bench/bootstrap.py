"""Benchmark: the gate's paired bootstrap, vectorised over per-image matches vs pycocotools.

The naive way re-runs pycocotools on every resample (the resampled images as renamed copies:
COCOeval's evaluate() and accumulate()) for both models. The vectorised way
(`core/evaluation/bootstrap.py`) runs pycocotools once per model and resamples the matches in
NumPy. Same synthetic ground truth and detections for both, measured in the same run; the
naive time for all resamples is extrapolated from a handful, whose AP50/AP the vectorised
resamples must reproduce (printed as the largest difference).

    PYTHONPATH=plugins .venv/bin/python bench/bootstrap.py [--images 40 200] [--resamples 1000]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from odapi_operators.core.evaluation.bootstrap import (
    matches_from,
    paired_intervals,
    resample_weights,
    resampled_metrics,
)
from odapi_operators.core.evaluation.coco_metrics import coco_eval

from support.detections import detections, ground_truth


def copies(gt: dict, found: list[dict], weights: np.ndarray) -> tuple[dict, list[dict]]:
    """The resample as a COCO dataset: image i drawn k times = k renamed copies."""
    boxes: dict[int, list[dict]] = {}
    dets: dict[int, list[dict]] = {}
    for a in gt["annotations"]:
        boxes.setdefault(a["image_id"], []).append(a)
    for d in found:
        dets.setdefault(d["image_id"], []).append(d)
    images, annotations, results = [], [], []
    for index, image in enumerate(gt["images"]):
        for _ in range(int(weights[index])):
            new_id = len(images) + 1
            images.append({**image, "id": new_id})
            annotations += [{**a, "id": len(annotations) + 1 + n, "image_id": new_id}
                            for n, a in enumerate(boxes.get(image["id"], []))]
            results += [{**d, "image_id": new_id} for d in dets.get(image["id"], [])]
    return {**gt, "images": images, "annotations": annotations}, results


def naive_metrics(gt: dict, found: list[dict], weights: np.ndarray) -> tuple[float, float]:
    stats = coco_eval(*copies(gt, found, weights)).stats
    return float(stats[0]), float(stats[1])


def bench(images: int, resamples: int, naive_samples: int, seed: int) -> dict:
    gt = ground_truth(images, seed=seed)
    models = [detections(gt, seed=seed + 1, false_per_image=20),
              detections(gt, seed=seed + 2, recall=0.7, false_per_image=20)]
    started = time.perf_counter()
    matches = [matches_from(coco_eval(gt, found)) for found in models]
    once = time.perf_counter() - started
    intervals = paired_intervals(*matches, matches[0].image_ids, ("AP", "AP50"),
                                 resamples=resamples, seed=seed)
    vectorised = time.perf_counter() - started

    weights = resample_weights(images, naive_samples, seed + 99)
    started = time.perf_counter()
    naive = [[naive_metrics(gt, found, row) for row in weights] for found in models]
    naive_each = (time.perf_counter() - started) / naive_samples
    worst = 0.0
    for side, found in enumerate(models):
        ours = resampled_metrics(matches[side], weights, ("AP", "AP50"))
        for row, (ap, ap50) in enumerate(naive[side]):
            worst = max(worst, abs(ours["AP"][row] - ap), abs(ours["AP50"][row] - ap50))
    return {"images": images, "detections": sum(len(m) for m in models) // 2,
            "vectorised_s": vectorised, "pycocotools_s": once, "naive_s": naive_each * resamples,
            "ratio": naive_each * resamples / vectorised, "max_diff": worst,
            "AP50_delta": intervals["AP50"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, nargs="+", default=[40, 200])
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--naive-samples", type=int, default=5,
                        help="pycocotools resamples actually run (then extrapolated)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(f"paired bootstrap, 2 models, {args.resamples} resamples, AP and AP50 "
          f"(naive: {args.naive_samples} resamples run, extrapolated)")
    print("vectorised: pycocotools once per model + the NumPy resampling (its share)")
    print(f"{'images':>6} {'dets/model':>10} {'vectorised s':>12} {'(resampling)':>12} "
          f"{'naive s':>9} {'ratio':>7} {'max |diff|':>10}  AP50 delta [95% interval]")
    for images in args.images:
        row = bench(images, args.resamples, args.naive_samples, args.seed)
        delta = row["AP50_delta"]
        print(f"{row['images']:>6} {row['detections']:>10} {row['vectorised_s']:>12.2f} "
              f"{row['vectorised_s'] - row['pycocotools_s']:>12.2f} {row['naive_s']:>9.1f} {row['ratio']:>6.0f}x {row['max_diff']:>10.1e}  "
              f"{delta.delta:+.3f} [{delta.low:+.3f}, {delta.high:+.3f}]")


if __name__ == "__main__":
    main()
