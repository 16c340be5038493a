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
DRAWN = (*CLASSES, "diamond")  # every shape `render_image` can draw; a later export may add one
MARKER = "_SUCCESS"
SIZES = (0.25, 0.5)  # object side as a share of the image's shorter side
PALETTES = {"any": (0, 256), "dark": (0, 110), "light": (150, 256)}


@dataclass(frozen=True)
class Look:
    """What a batch of images looks like, so exports can differ the way real batches do: a
    class added, objects smaller, colours shifted (bench/continuous.py)."""
    classes: tuple[str, ...] = CLASSES
    sizes: tuple[float, float] = SIZES
    palette: str = "any"


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


def _place(rng: np.random.Generator, width: int, height: int, taken: list[Shape],
           sizes: tuple[float, float] = SIZES):
    short = min(width, height)
    for _ in range(50):
        side = max(4, int(rng.uniform(*sizes) * short))
        x0 = int(rng.integers(0, width - side))
        y0 = int(rng.integers(0, height - side))
        box = (x0, y0, x0 + side, y0 + side)
        if all(_iou(box, s.box) < 0.1 for s in taken):
            return box
    return None


def render_image(rng: np.random.Generator, max_side: int,
                 look: Look = Look()) -> tuple[Image.Image, list[Shape]]:
    """One image with 1-4 shapes; box coordinates are exact shape extents in pixels."""
    unknown = set(look.classes) - set(DRAWN)
    if unknown or look.palette not in PALETTES:
        raise ValueError(f"cannot draw {sorted(unknown) or look.palette!r}: shapes are "
                         f"{', '.join(DRAWN)}, palettes {', '.join(PALETTES)}")
    width = int(rng.integers(max_side * 3 // 4, max_side + 1))
    height = int(rng.integers(max_side * 3 // 4, max_side + 1))
    image = Image.fromarray(_background(rng, width, height))
    draw = ImageDraw.Draw(image)
    shapes: list[Shape] = []
    for _ in range(int(rng.integers(1, 5))):
        box = _place(rng, width, height, shapes, look.sizes)
        if box is None:
            continue
        label = look.classes[int(rng.integers(0, len(look.classes)))]
        colour = tuple(int(c) for c in rng.integers(*PALETTES[look.palette], size=3))
        x0, y0, x1, y1 = box
        if label == "circle":
            draw.ellipse([x0, y0, x1 - 1, y1 - 1], fill=colour)
        elif label == "square":
            draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=colour)
        elif label == "diamond":
            cx, cy = (x0 + x1 - 1) / 2, (y0 + y1 - 1) / 2
            draw.polygon([(cx, y0), (x1 - 1, cy), (cx, y1 - 1), (x0, cy)], fill=colour)
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
             marker: str | None = MARKER, prefix: str = "shapes", look: Look = Look()) -> dict:
    """Write `count` JPEG + VOC XML pairs to `out_dir`; return a summary.

    Images are named `<prefix>_<index>.jpg`: an image's key comes from its name, so a second
    export of *other* images needs another prefix (the same names are the same images,
    relabelled). The completion marker (if any) is written last, so a watcher never sees half
    an export.
    """
    if count < 1:
        raise ValueError("count must be at least 1")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    boxes = 0
    per_class = dict.fromkeys(look.classes, 0)
    for index in range(count):
        image, shapes = render_image(rng, max_side, look)
        name = f"{prefix}_{index:05d}.jpg"
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=92)
        storage.write_bytes(out / name, buffer.getvalue())
        xml = voc_xml(name, f"/home/annotator/{prefix}/{name}", image.width, image.height,
                      shapes)
        storage.write_text(out / f"{Path(name).stem}.xml", xml)
        boxes += len(shapes)
        for s in shapes:
            per_class[s.label] += 1
    if marker:
        storage.write_text(out / marker, "")
    return {"out": str(out), "images": count, "boxes": boxes, "per_class": per_class,
            "seed": seed, "max_side": max_side}
