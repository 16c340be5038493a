"""Box validation shared by every annotation format."""

from __future__ import annotations

import math

from odapi_operators.core.data.manifest import Box

# Boxes may overshoot the image by this share of its side (annotation tools round); they are
# clipped. Beyond it, a box is rejected as outside the image.
CLIP_TOLERANCE = 0.02
# The largest side a JPEG can have; an annotation naming a larger (or fractional) image size is
# a typo or a unit mix-up, and dividing pixel boxes by it would rescale them silently.
MAX_IMAGE_SIDE = 65_535


def checked_size(width: float, height: float) -> tuple[int, int]:
    """An annotation's image size as whole pixels, 1..MAX_IMAGE_SIDE; raises ValueError.

    `<width>0.9</width>` must not become a width of 0.9 (every box scaled by 1.1) or of 0.
    """
    for side in (width, height):
        if isinstance(side, bool) or not 1 <= side <= MAX_IMAGE_SIDE or side != int(side):
            raise ValueError(f"invalid image size: {width:g}x{height:g} (width and height "
                             f"must be whole pixels from 1 to {MAX_IMAGE_SIDE})")
    return int(width), int(height)


def normalized_box(label: str, xmin: float, ymin: float, xmax: float, ymax: float,
                   width: float, height: float) -> Box:
    """Pixel box -> normalized, clipped `Box`; raises ValueError with the reason."""
    if not width or not height or width <= 0 or height <= 0:
        raise ValueError(f"invalid image size: {width}x{height}")
    return checked_box(label, xmin / width, ymin / height, xmax / width, ymax / height)


def checked_box(label: str, xmin: float, ymin: float, xmax: float, ymax: float) -> Box:
    """Validate a normalized box: finite, inside the image (with tolerance), not degenerate."""
    if 0.0 <= xmin < xmax <= 1.0 and 0.0 <= ymin < ymax <= 1.0 and label.strip() == label \
            and label:  # the common case, decided in one comparison chain (NaN fails it)
        return Box(label, xmin, ymin, xmax, ymax)
    coords = (xmin, ymin, xmax, ymax)
    if not all(math.isfinite(c) for c in coords):
        raise ValueError(f"non-finite coordinates: {coords}")
    if min(coords) < -CLIP_TOLERANCE or max(coords) > 1 + CLIP_TOLERANCE:
        raise ValueError(f"box outside the image: {tuple(round(c, 4) for c in coords)}")
    xmin, ymin, xmax, ymax = (min(max(c, 0.0), 1.0) for c in coords)
    if xmax <= xmin or ymax <= ymin:
        raise ValueError(f"degenerate box: {(xmin, ymin, xmax, ymax)}")
    if not label.strip():
        raise ValueError("empty class name")
    return Box(label.strip(), xmin, ymin, xmax, ymax)
