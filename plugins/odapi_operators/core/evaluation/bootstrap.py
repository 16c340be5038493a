"""Paired bootstrap intervals for COCO AP, in NumPy, from the per-image matches pycocotools made.

A gate that compares single AP numbers from a few dozen val images promotes noise. The interval
of the candidate-minus-production delta says how much of a delta is noise: resample the val
images with replacement (the same resamples for both models, so the interval is on the
*paired* difference) and recompute AP for every resample.

Re-running pycocotools per resample would take minutes. Instead the evaluator keeps, once per
model, what COCOeval's `evaluate()` decided per image (`evalImgs`, area range "all", 100
detections): every detection's score, class, image, whether it matched a ground-truth box at
each IoU threshold and whether it is ignored (matched a crowd box), plus the non-ignored
ground-truth boxes per image and class (`Matches`, stored as `matches.npz` beside
`metrics.json`). A resample is a weights matrix (R resamples x N images: how often each image
was drawn); AP for every resample at once is COCOeval's `accumulate()` with weighted counts:

- detections per class in pycocotools' order (stable sort by score), cumulative TP and FP
  counts at every true positive = weights @ per-image cumulative counts (one matrix product);
- recall and precision there, and COCO's 101-point interpolated precision: at recall
  threshold r, the highest precision at any recall >= r (a scatter-max into recall bins,
  then a suffix max), 0 when the recall is never reached;
- AP per class = mean over the 101 thresholds (and over IoU .50:.95 for `AP`), AP = the mean
  over classes with ground truth in that resample.

False positives after the last true positive of a class never raise an interpolated
precision, so only true-positive positions are evaluated. With every weight 1 the numbers
are pycocotools' own (tests check 1e-6); a weight of k is the image drawn k times.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from odapi_operators.core import storage
from odapi_operators.core.evaluation.names import METRICS

# Metrics the bootstrap can resample: name -> IoU threshold (None: the mean over .50:.95).
_CHUNK = 4_000_000  # resample rows x true-positive columns per matrix product (memory bound)


@dataclass(frozen=True)
class Matches:
    """One model's per-image COCO matches on an eval split (pycocotools' order throughout)."""

    image_ids: np.ndarray  # (N,) COCO image ids, ascending (COCOeval's imgIds)
    category_ids: np.ndarray  # (K,) COCO category ids, ascending (COCOeval's catIds)
    iou_thresholds: np.ndarray  # (T,) .50:.05:.95
    recall_thresholds: np.ndarray  # (101,)
    gt_count: np.ndarray  # (N, K) non-ignored ground-truth boxes
    det_image: np.ndarray  # (D,) index into image_ids
    det_class: np.ndarray  # (D,) index into category_ids
    det_score: np.ndarray  # (D,)
    det_match: np.ndarray  # (D, T) matched a ground-truth box at that IoU
    det_ignore: np.ndarray  # (D, T) matched an ignored (crowd) box: neither TP nor FP
    slices: dict[str, np.ndarray] = field(default_factory=dict)  # name -> image ids

    def subset(self, image_ids: Iterable[int]) -> Matches:
        """The matches of some images only (a slice), same order, same classes."""
        keep = np.isin(self.image_ids, np.fromiter(image_ids, dtype=np.int64))
        new_index = np.cumsum(keep) - 1
        dets = keep[self.det_image]
        return Matches(self.image_ids[keep], self.category_ids, self.iou_thresholds,
                       self.recall_thresholds, self.gt_count[keep], new_index[self.det_image[dets]],
                       self.det_class[dets], self.det_score[dets], self.det_match[dets],
                       self.det_ignore[dets])


def matches_from(evaluator: Any) -> Matches:
    """The matches of an evaluated pycocotools COCOeval (`evaluate()` has run)."""
    params = evaluator.params
    images, classes = list(params.imgIds), list(params.catIds)
    areas, thresholds = len(params.areaRng), len(params.iouThrs)
    gt_count = np.zeros((len(images), len(classes)), dtype=np.int64)
    det_image, det_class, scores, match, ignore = [], [], [], [], []
    for k in range(len(classes)):
        for n in range(len(images)):
            entry = evaluator.evalImgs[k * areas * len(images) + n]  # area range 0: "all"
            if entry is None:
                continue
            gt_count[n, k] = int(np.count_nonzero(np.asarray(entry["gtIgnore"]) == 0))
            count = len(entry["dtScores"])
            if count:
                det_image.append(np.full(count, n))
                det_class.append(np.full(count, k))
                scores.append(np.asarray(entry["dtScores"], dtype=np.float64))
                match.append(np.asarray(entry["dtMatches"]).T > 0)
                ignore.append(np.asarray(entry["dtIgnore"]).T > 0)

    def joined(parts: list[np.ndarray], dtype: Any, width: int | None = None) -> np.ndarray:
        if parts:
            return np.concatenate(parts).astype(dtype)
        return np.zeros((0, width) if width else 0, dtype=dtype)

    return Matches(np.asarray(images, dtype=np.int64), np.asarray(classes, dtype=np.int64),
                   np.asarray(params.iouThrs, dtype=np.float64),
                   np.asarray(params.recThrs, dtype=np.float64), gt_count,
                   joined(det_image, np.int64), joined(det_class, np.int64),
                   joined(scores, np.float64), joined(match, bool, thresholds),
                   joined(ignore, bool, thresholds))


_ARRAYS = ("image_ids", "category_ids", "iou_thresholds", "recall_thresholds", "gt_count",
           "det_image", "det_class", "det_score", "det_match", "det_ignore")


def write_matches(path: str | Path, matches: Matches) -> None:
    """`matches.npz` (atomic): the arrays, plus `slice_<name>` image ids per slice."""
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **{name: getattr(matches, name) for name in _ARRAYS},
                        **{f"slice_{name}": np.asarray(ids, dtype=np.int64)
                           for name, ids in matches.slices.items()})
    storage.write_bytes(path, buffer.getvalue())


def read_matches(path: str | Path) -> Matches:
    with np.load(io.BytesIO(storage.read_bytes(path))) as data:
        slices = {name[len("slice_"):]: data[name] for name in data.files
                  if name.startswith("slice_")}
        return Matches(**{name: data[name] for name in _ARRAYS}, slices=slices)


@dataclass(frozen=True)
class _Curves:
    """Per IoU threshold: the true-positive positions of every class, as per-image counts."""

    thresholds: list[int]  # indices into iou_thresholds
    columns: list[tuple[np.ndarray, np.ndarray, np.ndarray]]  # (class, TP counts, FP counts)


def _curves(matches: Matches, thresholds: list[int]) -> _Curves:
    """For each true positive (per class, in score order): per image, the TPs up to it and the
    FPs before it. Cumulative counts of a resample are then `weights @ counts`."""
    n_images = len(matches.image_ids)
    order = np.lexsort((-matches.det_score, matches.det_class))  # stable, like pycocotools
    image, klass = matches.det_image[order], matches.det_class[order]
    starts = np.searchsorted(klass, np.arange(len(matches.category_ids) + 1))
    columns = []
    for t in thresholds:
        matched, ignored = matches.det_match[order, t], matches.det_ignore[order, t]
        tp, fp = matched & ~ignored, ~matched & ~ignored
        classes, tp_counts, fp_counts = [], [], []
        for k in range(len(matches.category_ids)):
            span = slice(starts[k], starts[k + 1])
            positions = np.flatnonzero(tp[span])
            if not positions.size:
                continue
            hits = np.zeros((n_images, positions.size), dtype=np.float32)
            hits[image[span][positions], np.arange(positions.size)] = 1
            before = np.cumsum(tp[span])  # TPs up to each detection (an FP: TPs before it)
            false = np.flatnonzero(fp[span] & (before < positions.size))
            misses = np.zeros((n_images, positions.size), dtype=np.float32)
            np.add.at(misses, (image[span][false], before[false]), 1)
            classes.append(np.full(positions.size, k))
            tp_counts.append(np.cumsum(hits, axis=1, dtype=np.float32))
            fp_counts.append(np.cumsum(misses, axis=1, dtype=np.float32))
        if classes:
            columns.append((np.concatenate(classes), np.hstack(tp_counts),
                            np.hstack(fp_counts)))
        else:
            empty = np.zeros((n_images, 0), dtype=np.float32)
            columns.append((np.zeros(0, dtype=np.int64), empty, empty))
    return _Curves(thresholds, columns)


def _thresholds_reached(thresholds: np.ndarray, values: np.ndarray) -> np.ndarray:
    """How many thresholds are <= each value: `searchsorted(side="right")`, exactly, but
    four times faster for COCO's evenly spaced 0..1 thresholds (a guess from the spacing,
    then one exact correction each way)."""
    n = len(thresholds)
    if not np.array_equal(thresholds, np.linspace(0.0, 1.0, n)):
        return np.searchsorted(thresholds, values, side="right")
    guess = np.clip(np.floor(values * (n - 1)).astype(np.int64) + 1, 0, n)
    guess -= (guess > 0) & (thresholds[np.maximum(guess - 1, 0)] > values)
    guess += (guess < n) & (thresholds[np.minimum(guess, n - 1)] <= values)
    return guess


def _class_ap(weights: np.ndarray, gt: np.ndarray, column_class: np.ndarray,
              tp_counts: np.ndarray, fp_counts: np.ndarray,
              recall_thresholds: np.ndarray) -> np.ndarray:
    """AP per resample and class at one IoU threshold: (R, K), COCO's accumulate()."""
    rows, classes, bins = len(weights), gt.shape[1], len(recall_thresholds) + 1
    tp = (weights @ tp_counts).astype(np.float64)  # float32 products of integers: exact
    fp = (weights @ fp_counts).astype(np.float64)
    positives = gt[:, column_class]
    with np.errstate(divide="ignore", invalid="ignore"):
        recall = tp / positives
        precision = tp / (fp + tp + np.spacing(1))
    # bin b: the highest recall threshold reached is 100 - b (b = 101: none, counts nowhere);
    # bins lead the layout so the running max runs over contiguous rows
    reached = _thresholds_reached(recall_thresholds, np.where(positives > 0, recall, -1.0))
    flat = (bins - 1 - reached) * (rows * classes) + (np.arange(rows)[:, None] * classes
                                                       + column_class)
    best = np.zeros(bins * rows * classes)
    np.maximum.at(best, flat.ravel(), precision.ravel())
    # interpolated precision at threshold 100 - b: the best precision reaching it or higher
    interpolated = np.maximum.accumulate(best.reshape(bins, rows * classes)[:-1], axis=0)
    return interpolated.mean(axis=0).reshape(rows, classes)


def resampled_metrics(matches: Matches, weights: np.ndarray,
                      metrics: Sequence[str] = ("AP", "AP50")) -> dict[str, np.ndarray]:
    """Each metric for every row of `weights` (R x N images, in `matches.image_ids` order):
    NaN where no class has ground truth in the resample."""
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"the bootstrap resamples {', '.join(METRICS)}, not {unknown}")
    weights = np.asarray(weights, dtype=np.float32)  # draw counts: exact below 2**24
    ious = matches.iou_thresholds

    def index(iou: float) -> int:
        return int(np.argmin(np.abs(ious - iou)))

    needed = sorted({t for m in metrics
                     for t in ([index(METRICS[m])] if METRICS[m] is not None
                               else range(len(ious)))})
    curves = _curves(matches, needed)
    gt = weights.astype(np.float64) @ matches.gt_count
    per_threshold = np.zeros((len(weights), len(matches.category_ids), len(ious)))
    widest = max([c[0].size for c in curves.columns] + [1])
    step = max(1, _CHUNK // widest)
    for t, (column_class, tp_counts, fp_counts) in zip(curves.thresholds, curves.columns):
        for start in range(0, len(weights), step):
            rows = slice(start, start + step)
            per_threshold[rows, :, t] = _class_ap(weights[rows], gt[rows], column_class,
                                                  tp_counts, fp_counts,
                                                  matches.recall_thresholds)
    valid = gt > 0
    counted = valid.sum(axis=1)
    result = {}
    for metric in metrics:
        iou = METRICS[metric]
        per_class = (per_threshold[:, :, index(iou)] if iou is not None
                     else per_threshold[:, :, needed].mean(axis=-1))
        with np.errstate(invalid="ignore"):
            result[metric] = np.where(counted > 0, (per_class * valid).sum(axis=1) /
                                      np.maximum(counted, 1), np.nan)
    return result


def resample_weights(images: int, resamples: int, seed: int) -> np.ndarray:
    """R x N draw counts: resample r draws N images with replacement (seeded)."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(images, np.full(images, 1.0 / images), size=resamples)


@dataclass(frozen=True)
class PairedInterval:
    """Candidate minus production on the same images: the point delta and its interval."""

    metric: str
    candidate: float
    production: float
    delta: float
    low: float | None
    high: float | None
    images: int
    resamples: int  # resamples with a defined metric on both sides

    def as_dict(self) -> dict:
        return {"metric": self.metric, "candidate": self.candidate,
                "production": self.production, "delta": self.delta,
                "interval": None if self.low is None else [self.low, self.high],
                "images": self.images, "resamples": self.resamples}


def paired_intervals(candidate: Matches, production: Matches, image_ids: Iterable[int],
                     metrics: Sequence[str] = ("AP", "AP50"), *, resamples: int = 1000,
                     confidence: float = 0.95, seed: int = 0) -> dict[str, PairedInterval]:
    """Percentile intervals of candidate-minus-production per metric over `image_ids`.

    Both models must have been evaluated on those images (the same split); every resample
    weighs both with the same draw, so what the two share (an image hard for both) cancels.
    """
    ids = np.unique(np.fromiter(image_ids, dtype=np.int64))
    for name, side in (("candidate", candidate), ("production", production)):
        missing = np.setdiff1d(ids, side.image_ids)
        if missing.size:
            raise ValueError(f"the {name} was not evaluated on image(s) "
                             f"{missing[:5].tolist()}: not the same split")
        if not np.array_equal(side.category_ids, candidate.category_ids):
            raise ValueError("candidate and production were evaluated with different classes")
    sides = [side.subset(ids) for side in (candidate, production)]
    weights = np.vstack([np.ones((1, ids.size)), resample_weights(ids.size, resamples, seed)])
    values = [resampled_metrics(side, weights, metrics) for side in sides]
    tail = (1 - confidence) / 2 * 100
    result = {}
    for metric in metrics:
        full = [float(v[metric][0]) for v in values]
        deltas = values[0][metric][1:] - values[1][metric][1:]
        deltas = deltas[np.isfinite(deltas)]
        low, high = (np.percentile(deltas, [tail, 100 - tail]).tolist() if deltas.size
                     else (None, None))
        result[metric] = PairedInterval(metric, full[0], full[1], full[0] - full[1], low, high,
                                        int(ids.size), int(deltas.size))
    return result
