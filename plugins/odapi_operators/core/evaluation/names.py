"""Names the gate's config validates against, kept free of NumPy: the config (and so every DAG
file) imports the gate's policy at parse time."""

from __future__ import annotations

SLICES = ("all", "new", "old")
# Metrics the paired bootstrap can resample: name -> IoU threshold (None: COCO's .50:.95).
METRICS: dict[str, float | None] = {"AP": None, "AP50": 0.5, "AP75": 0.75}
