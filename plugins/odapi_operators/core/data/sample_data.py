"""Deterministic synthetic detection data: coloured shapes on noisy backgrounds.

Writes a real labelImg-style Pascal VOC export (one XML next to each JPEG, with the
annotator's absolute `<path>` as labelImg writes it) so the sample exercises the same ingest
path as user data. Same seed and size in, same bytes out.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np
from PIL import Image, ImageDraw

from odapi_operators.core import storage

CLASSES = ("circle", "square", "triangle")
MARKER = "_SUCCESS"


@dataclass(frozen=True)
class Shape:
    label: str
    box: tuple[int, int, int, int]  # xmin, ymin, xmax, ymax in pixels


def _iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union else 0.0


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    base = rng.integers(40, 216, size=3)
    ramp = np.linspace(-30, 30, width)[None, :, None] * rng.choice([-1, 1])
    noise = rng.normal(0, 18, size=(height, width, 3))
    return np.clip(base[None, None, :] + ramp + noise, 0, 255).astype(np.uint8)


def _place(rng: np.random.Generator, width: int, height: int, taken: list[Shape]):
    short = min(width, height)
    for _ in range(50):
        side = int(rng.uniform(0.25, 0.5) * short)
        x0 = int(rng.integers(0, width - side))
        y0 = int(rng.integers(0, height - side))
        box = (x0, y0, x0 + side, y0 + side)
        if all(_iou(box, s.box) < 0.1 for s in taken):
            return box
    return None


def render_image(rng: np.random.Generator, max_side: int) -> tuple[Image.Image, list[Shape]]:
    """One image with 1-4 shapes; box coordinates are exact shape extents in pixels."""
    width = int(rng.integers(max_side * 3 // 4, max_side + 1))
    height = int(rng.integers(max_side * 3 // 4, max_side + 1))
    image = Image.fromarray(_background(rng, width, height))
    draw = ImageDraw.Draw(image)
    shapes: list[Shape] = []
    for _ in range(int(rng.integers(1, 5))):
        box = _place(rng, width, height, shapes)
        if box is None:
            continue
        label = CLASSES[int(rng.integers(0, len(CLASSES)))]
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        x0, y0, x1, y1 = box
        if label == "circle":
            draw.ellipse([x0, y0, x1 - 1, y1 - 1], fill=colour)
        elif label == "square":
            draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=colour)
        else:
            draw.polygon([(x0, y1 - 1), (x1 - 1, y1 - 1), ((x0 + x1 - 1) / 2, y0)], fill=colour)
        shapes.append(Shape(label, box))
    return image, shapes


def voc_xml(filename: str, annotator_path: str, width: int, height: int,
            shapes: list[Shape]) -> str:
    """Pascal VOC XML in the layout labelImg writes."""
    objects = "".join(
        f"""
\t<object>
\t\t<name>{escape(s.label)}</name>
\t\t<pose>Unspecified</pose>
\t\t<truncated>0</truncated>
\t\t<difficult>0</difficult>
\t\t<bndbox>
\t\t\t<xmin>{s.box[0]}</xmin>
\t\t\t<ymin>{s.box[1]}</ymin>
\t\t\t<xmax>{s.box[2]}</xmax>
\t\t\t<ymax>{s.box[3]}</ymax>
\t\t</bndbox>
\t</object>"""
        for s in shapes
    )
    return f"""<annotation>
\t<folder>shapes</folder>
\t<filename>{escape(filename)}</filename>
\t<path>{escape(annotator_path)}</path>
\t<source>
\t\t<database>Unknown</database>
\t</source>
\t<size>
\t\t<width>{width}</width>
\t\t<height>{height}</height>
\t\t<depth>3</depth>
\t</size>
\t<segmented>0</segmented>{objects}
</annotation>
"""


def generate(out_dir: str | Path, count: int = 200, seed: int = 0, max_side: int = 160,
             marker: str | None = MARKER) -> dict:
    """Write `count` JPEG + VOC XML pairs to `out_dir`; return a summary.

    The completion marker (if any) is written last, so a watcher never sees half an export.
    """
    if count < 1:
        raise ValueError("count must be at least 1")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    boxes = 0
    per_class = dict.fromkeys(CLASSES, 0)
    for index in range(count):
        image, shapes = render_image(rng, max_side)
        name = f"shapes_{index:05d}.jpg"
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=92)
        storage.write_bytes(out / name, buffer.getvalue())
        xml = voc_xml(name, f"/home/annotator/shapes/{name}", image.width, image.height, shapes)
        storage.write_text(out / f"{Path(name).stem}.xml", xml)
        boxes += len(shapes)
        for s in shapes:
            per_class[s.label] += 1
    if marker:
        storage.write_text(out / marker, "")
    return {"out": str(out), "images": count, "boxes": boxes, "per_class": per_class,
            "seed": seed, "max_side": max_side}
