"""Orientation as a list of Pillow transposes, applied alike to pixels and to boxes.

EXIF orientation (what cameras write) and `ImageRecord.rotation` (clockwise degrees, e.g. Open
Images' `Rotation`) both describe how the stored pixels must turn to be upright. Boxes in the
manifest refer to the stored pixels, so every transpose applied to the pixels is applied to
the boxes too; TensorFlow's decoders ignore EXIF, so the output carries no orientation tag.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Iterable

from PIL import Image

from odapi_operators.core.data.manifest import Box

T = Image.Transpose
EXIF_ORIENTATION_TAG = 0x0112
EXIF_OPS: dict[int, tuple[int, ...]] = {
    2: (T.FLIP_LEFT_RIGHT,), 3: (T.ROTATE_180,), 4: (T.FLIP_TOP_BOTTOM,), 5: (T.TRANSPOSE,),
    6: (T.ROTATE_270,), 7: (T.TRANSVERSE,), 8: (T.ROTATE_90,),
}
ROTATION_OPS: dict[int, tuple[int, ...]] = {  # clockwise degrees; Pillow's ROTATE_n is counter
    0: (), 90: (T.ROTATE_270,), 180: (T.ROTATE_180,), 270: (T.ROTATE_90,),
}


def orientation_ops(exif_orientation: int | None, rotation: int) -> tuple[int, ...]:
    """EXIF first (it makes the image look as the camera saw it), then the record's rotation."""
    if rotation not in ROTATION_OPS:
        raise ValueError(f"invalid rotation: {rotation} (expected 0, 90, 180 or 270)")
    return tuple(int(op) for op in EXIF_OPS.get(exif_orientation or 1, ()) + ROTATION_OPS[rotation])


def _point(op: int, x: float, y: float) -> tuple[float, float]:
    """Where normalized point (x, y) lands after transpose `op`."""
    if op == T.FLIP_LEFT_RIGHT:
        return 1 - x, y
    if op == T.FLIP_TOP_BOTTOM:
        return x, 1 - y
    if op == T.ROTATE_90:     # counterclockwise: the right edge becomes the top
        return y, 1 - x
    if op == T.ROTATE_180:
        return 1 - x, 1 - y
    if op == T.ROTATE_270:    # clockwise: the top edge becomes the right
        return 1 - y, x
    if op == T.TRANSPOSE:
        return y, x
    if op == T.TRANSVERSE:
        return 1 - y, 1 - x
    raise ValueError(f"unknown transpose {op}")


def transform_box(box: Box, ops: Iterable[int]) -> Box:
    corners = [(box.xmin, box.ymin), (box.xmax, box.ymax)]
    for op in ops:
        corners = [_point(op, x, y) for x, y in corners]
    xs, ys = [c[0] for c in corners], [c[1] for c in corners]
    return replace(box, xmin=min(xs), xmax=max(xs), ymin=min(ys), ymax=max(ys))


def transform_boxes(boxes: tuple[Box, ...], ops: Iterable[int]) -> tuple[Box, ...]:
    ops = tuple(ops)
    return tuple(transform_box(b, ops) for b in boxes) if ops else boxes
