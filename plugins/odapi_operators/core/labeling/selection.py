"""Active-learning selection: which unlabeled images would teach the model most if labeled.

Per image (pure functions of the detections, so a fixed pool and model rank the same way):

- uncertainty: the binary entropy (bits) of every detection whose score lies in the
  borderline `band` (the model is unsure whether the object is there), plus 1 - the top score
  (nothing found confidently: a missed class or an unusual scene);
- disagreement (with a candidate model): production and candidate boxes above the score
  threshold are matched greedily by IoU; unmatched boxes on either side and matched pairs
  with different classes, over the union of objects, in [0, 1];
- informativeness = uncertainty + `disagreement_weight` * disagreement, rounded to 1e-6 so
  float noise between a local model and TF Serving cannot reorder ties.

Ranking is by informativeness, then key. A diversity guard walks the ranking and skips an
image whose 64-bit dHash lies within `max_hamming` bits of one already chosen (or already
sent), so a burst of near-identical frames costs one label, not K.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence, TypeVar

import numpy as np

T = TypeVar("T")


@dataclass(frozen=True)
class SelectionPolicy:
    band: tuple[float, float] = (0.2, 0.6)
    match_iou: float = 0.5
    disagreement_weight: float = 2.0
    max_hamming: int = 6  # dHash bits; unrelated images differ in ~32


def binary_entropy(p: float) -> float:
    """Entropy in bits of a yes/no with probability `p` (1 at 0.5, 0 at 0 and 1)."""
    if p <= 0.0 or p >= 1.0:
        return 0.0
    return -(p * math.log2(p) + (1 - p) * math.log2(1 - p))


def uncertainty(scores: Sequence[float], band: tuple[float, float]) -> dict:
    """Borderline count, their entropy, the top score and the uncertainty they add up to."""
    low, high = band
    borderline = [float(s) for s in scores if low <= s <= high]
    entropy = sum((binary_entropy(s) for s in borderline), 0.0)
    top = max((float(s) for s in scores), default=0.0)
    return {"borderline": len(borderline), "entropy": entropy, "max_score": top,
            "uncertainty": entropy + 1.0 - top}


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box of `a` with every box of `b` ([ymin, xmin, ymax, xmax] rows)."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    top = np.maximum(a[:, None, 0], b[None, :, 0])
    left = np.maximum(a[:, None, 1], b[None, :, 1])
    bottom = np.minimum(a[:, None, 2], b[None, :, 2])
    right = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(bottom - top, 0, None) * np.clip(right - left, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def disagreement(production, candidate, threshold: float, match_iou: float) -> dict:
    """Unmatched and class-flipped boxes between two models' detections (see module doc)."""
    keep_p = np.asarray(production.scores) >= threshold
    keep_c = np.asarray(candidate.scores) >= threshold
    boxes_p = np.asarray(production.boxes).reshape(-1, 4)[keep_p]
    boxes_c = np.asarray(candidate.boxes).reshape(-1, 4)[keep_c]
    classes_p = np.asarray(production.classes)[keep_p]
    classes_c = np.asarray(candidate.classes)[keep_c]
    overlaps = iou_matrix(boxes_p, boxes_c)
    pairs = sorted(((overlaps[i, j], i, j) for i in range(len(boxes_p))
                    for j in range(len(boxes_c)) if overlaps[i, j] >= match_iou),
                   key=lambda t: (-t[0], t[1], t[2]))
    used_p: set[int] = set()
    used_c: set[int] = set()
    flipped = 0
    for _, i, j in pairs:
        if i in used_p or j in used_c:
            continue
        used_p.add(i)
        used_c.add(j)
        flipped += int(classes_p[i] != classes_c[j])
    unmatched = len(boxes_p) - len(used_p) + len(boxes_c) - len(used_c)
    objects = len(boxes_p) + len(boxes_c) - len(used_p)
    return {"unmatched": unmatched, "flipped": flipped,
            "disagreement": (unmatched + flipped) / objects if objects else 0.0}


def informativeness(production, candidate, threshold: float, policy: SelectionPolicy) -> dict:
    """Every component for one image, and the `score` the ranking uses."""
    parts = uncertainty([float(s) for s in production.scores], policy.band)
    if candidate is not None:
        parts |= disagreement(production, candidate, threshold, policy.match_iou)
    score = parts["uncertainty"] + policy.disagreement_weight * parts.get("disagreement", 0.0)
    return {**{k: round(v, 6) if isinstance(v, float) else v for k, v in parts.items()},
            "score": round(score, 6)}


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


def rank(items: Iterable[T], score: Callable[[T], float], key: Callable[[T], str]) -> list[T]:
    """Most informative first; ties broken by key, so the order never depends on arrival."""
    return sorted(items, key=lambda item: (-score(item), key(item)))


def pick_diverse(ranked: Sequence[T], k: int | None, perceptual: Callable[[T], int],
                 seen: Iterable[int] = (), max_hamming: int = 6) -> tuple[list[T], list[T]]:
    """(chosen, near-duplicates skipped): walk `ranked`, keep up to `k` (None: all) whose
    hash is more than `max_hamming` bits from every chosen or `seen` hash (vectorized: the
    sent ledger's hashes may be many)."""
    taken = np.fromiter(seen, dtype=np.uint64)
    chosen: list[T] = []
    skipped: list[T] = []
    for item in ranked:
        if k is not None and len(chosen) >= k:
            break
        value = np.uint64(perceptual(item))
        if taken.size and int(np.bitwise_count(taken ^ value).min()) <= max_hamming:
            skipped.append(item)
            continue
        chosen.append(item)
        taken = np.append(taken, value)
    return chosen, skipped
