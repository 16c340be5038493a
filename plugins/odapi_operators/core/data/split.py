"""Stable train/val/test assignment: a hash of the image key, never the order of arrival.

An image stays in its split as the dataset grows, so evaluation stays comparable between
retrains.
"""

from __future__ import annotations

import hashlib


def split_of(key: str, ratios: dict[str, float]) -> str:
    """The split for `key` given ordered `ratios` (e.g. {'train': .8, 'val': .2})."""
    total = sum(ratios.values())
    if total <= 0:
        raise ValueError(f"split ratios must sum to a positive number: {ratios}")
    point = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64 * total
    cumulative = 0.0
    for name, ratio in ratios.items():
        cumulative += ratio
        if point < cumulative:
            return name
    return list(ratios)[-1]
