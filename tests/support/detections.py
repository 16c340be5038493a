"""Synthetic COCO ground truth and detections: a nontrivial eval without any model.

Boxes of several classes (one class without ground truth, some crowd boxes), detections that
hit at varied IoUs, miss, fire twice on one object, hallucinate, and tie on score: everything
pycocotools' matching and accumulation treat specially.
"""

from __future__ import annotations

import numpy as np

CATEGORIES = [{"id": 1, "name": "circle"}, {"id": 2, "name": "square"},
              {"id": 3, "name": "triangle"}, {"id": 5, "name": "never_seen"}]
SIDE = 200


def ground_truth(images: int, seed: int = 0, crowd: float = 0.05) -> dict:
    """`images` images of 1-6 boxes of classes 1-3 (class 5 has no ground truth)."""
    rng = np.random.default_rng(seed)
    annotations = []
    for image in range(1, images + 1):
        for _ in range(rng.integers(1, 7)):
            w, h = rng.uniform(8, 80, size=2)
            x, y = rng.uniform(0, SIDE - w), rng.uniform(0, SIDE - h)
            annotations.append({"id": len(annotations) + 1, "image_id": image,
                                "category_id": int(rng.choice([1, 2, 3], p=[.5, .3, .2])),
                                "bbox": [x, y, w, h], "area": w * h,
                                "iscrowd": int(rng.random() < crowd)})
    return {"images": [{"id": i, "file_name": f"{i}.jpg", "width": SIDE, "height": SIDE}
                       for i in range(1, images + 1)],
            "annotations": annotations, "categories": CATEGORIES}


def detections(gt: dict, seed: int = 1, recall: float = 0.8, jitter: float = 0.15,
               false_per_image: float = 2.0, image_ids: set[int] | None = None) -> list[dict]:
    """A detector's output on `gt` (on `image_ids` only, if given): found boxes jittered by up
    to `jitter` of their size, duplicates, hallucinations, some scores rounded into ties."""
    rng = np.random.default_rng(seed)
    found = []
    for a in gt["annotations"]:
        if (image_ids is not None and a["image_id"] not in image_ids) or rng.random() > recall:
            continue
        x, y, w, h = a["bbox"]
        for copy in range(1 + int(rng.random() < 0.1)):  # sometimes a duplicate detection
            dx, dy, dw, dh = rng.uniform(-jitter, jitter, size=4)
            score = float(rng.uniform(0.3, 1.0)) * (0.5 if copy else 1.0)
            found.append({"image_id": a["image_id"], "category_id": a["category_id"],
                          "bbox": [x + dx * w, y + dy * h, w * (1 + dw), h * (1 + dh)],
                          "score": round(score, 2) if rng.random() < 0.2 else score})
    for image in gt["images"]:
        if image_ids is not None and image["id"] not in image_ids:
            continue
        for _ in range(rng.poisson(false_per_image)):
            w, h = rng.uniform(8, 60, size=2)
            found.append({"image_id": image["id"], "category_id": int(rng.choice([1, 2, 3, 5])),
                          "bbox": [float(rng.uniform(0, SIDE - w)), float(rng.uniform(0, SIDE - h)),
                                   float(w), float(h)],
                          "score": float(rng.uniform(0.05, 0.9))})
    return found


def perfect(gt: dict, image_ids: set[int] | None = None) -> list[dict]:
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"],
             "score": 0.99} for a in gt["annotations"]
            if image_ids is None or a["image_id"] in image_ids]
