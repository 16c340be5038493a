"""Judging a model: COCO metrics, the promotion gate, the run's HTML report."""
