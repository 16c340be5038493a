"""Benchmark: `odapi ingest` on a large generated Open Images export.

Writes a boxes CSV (sorted by ImageID, as Open Images ships it), the class descriptions and
an image index, then times the full ingest (parse, validate, merge, manifest, label map) and,
as the floor to compare with, one plain `csv.reader` pass over the same boxes file.

    .venv/bin/python bench/ingest_openimages.py [--images 20000] [--boxes-per-image 10]
"""

from __future__ import annotations

import argparse
import base64
import csv
import hashlib
import random
import resource
import tempfile
import time
from pathlib import Path

BOXES_HEADER = ("ImageID,Source,LabelName,Confidence,XMin,XMax,YMin,YMax,IsOccluded,"
                "IsTruncated,IsGroupOf,IsDepiction,IsInside")
INDEX_HEADER = ("ImageID,Subset,OriginalURL,OriginalLandingURL,License,AuthorProfileURL,"
                "Author,Title,OriginalSize,OriginalMD5,Thumbnail300KURL,Rotation")
CLASSES = {f"/m/0{i:04d}": f"class{i}" for i in range(50)}


def write_export(folder: Path, images: int, per_image: int) -> Path:
    rng = random.Random(0)
    mids = list(CLASSES)
    folder.mkdir(parents=True)
    with open(folder / "class-descriptions-boxable.csv", "w") as fh:
        fh.writelines(f"{mid},{name}\n" for mid, name in CLASSES.items())
    with open(folder / "train-images-boxable-with-rotation.csv", "w") as fh:
        fh.write(INDEX_HEADER + "\n")
        for i in range(images):
            md5 = base64.b64encode(hashlib.md5(str(i).encode()).digest()).decode()
            fh.write(f"{i:016x},train,http://127.0.0.1:1/{i:016x}.jpg,,,,,,1000,{md5},,0\n")
    boxes = folder / "train-annotations-bbox.csv"
    with open(boxes, "w") as fh:
        fh.write(BOXES_HEADER + "\n")
        for i in range(images):
            for _ in range(per_image):
                x0, y0 = rng.random() * 0.8, rng.random() * 0.8
                fh.write(f"{i:016x},xclick,{rng.choice(mids)},1,{x0:.6f},{x0 + 0.1:.6f},"
                         f"{y0:.6f},{y0 + 0.1:.6f},0,0,0,0,0\n")
    return boxes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--boxes-per-image", type=int, default=10)
    args = parser.parse_args()
    from odapi_operators.core.data.ingest import ingest

    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        boxes_csv = write_export(tmp / "export", args.images, args.boxes_per_image)
        rows = args.images * args.boxes_per_image
        start = time.perf_counter()
        with open(boxes_csv, newline="") as fh:
            floor_rows = sum(1 for _ in csv.reader(fh)) - 1
        floor = time.perf_counter() - start
        start = time.perf_counter()
        summary = ingest([str(tmp / "export")], tmp / "out")
        seconds = time.perf_counter() - start
        size_mb = boxes_csv.stat().st_size / 1e6
    assert floor_rows == rows and summary["boxes"] == rows and summary["images"] == args.images
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"Open Images export: {args.images} images, {rows} boxes (~{size_mb:.0f} MB boxes CSV)")
    print(f"odapi ingest:        {rows / seconds:10.0f} boxes/s  {args.images / seconds:8.0f} "
          f"images/s  ({seconds:.1f} s, peak RSS {peak_mb:.0f} MB)")
    print(f"csv.reader floor:    {rows / floor:10.0f} rows/s   ({floor:.1f} s)")
    print(f"ratio ingest/floor:  {floor / seconds:10.3f}")


if __name__ == "__main__":
    main()
