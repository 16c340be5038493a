"""Benchmark: verify + resize of 2-4 Mpx JPEGs, odapi's `normalize` vs the naive way.

Same files, same output size limit (--max-side), one process, best of --repeat:
- odapi: `normalize` (magic-byte check, draft-mode decode at 1/2-1/8 scale, EXIF, resize, encode);
- naive: open + verify() + reopen + convert("RGB") + thumbnail + encode (the seed tutorial's
  check; convert() forces a full-size decode before the thumbnail);
- naive-no-convert: open + verify() + reopen + thumbnail + encode. thumbnail() drafts too, so
  it is about as fast as odapi, but verify() is no integrity check (a half JPEG passes), so
  only the first naive variant checks as much as odapi does.

    .venv/bin/python bench/resize.py [--images 24] [--max-side 640] [--repeat 3]
"""

from __future__ import annotations

import argparse
import io
import time

import numpy as np
from PIL import Image

from odapi_operators.core.data.normalize import NormalizeOptions, normalize

SIZES = [(1920, 1080), (2048, 1536), (2400, 1600), (2304, 1728)]  # 2.1-4.0 Mpx


def make_jpegs(count: int) -> list[bytes]:
    rng = np.random.default_rng(1)
    out = []
    for i in range(count):
        w, h = SIZES[i % len(SIZES)]
        y, x = np.mgrid[0:h, 0:w]
        a, b = rng.uniform(0.05, 0.3, 2)
        base = np.stack([x * a, y * b, (x * a + y * b) / 2], axis=-1) % 256
        pixels = np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def ours(data: bytes, side: int) -> bytes:
    return normalize(data, options=NormalizeOptions(max_side=side)).data


def naive(data: bytes, side: int, convert: bool = True) -> bytes:
    Image.open(io.BytesIO(data)).verify()
    image = Image.open(io.BytesIO(data))
    if convert:
        image = image.convert("RGB")
    image.thumbnail((side, side))
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=95)
    return buf.getvalue()


def best(fn, images: list[bytes], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        for data in images:
            fn(data)
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--max-side", type=int, default=640)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    images = make_jpegs(args.images)
    side = args.max_side
    for data in images[:2]:  # same output size from all three
        sizes = {Image.open(io.BytesIO(f(data))).size for f in
                 (lambda d: ours(d, side), lambda d: naive(d, side),
                  lambda d: naive(d, side, False))}
        assert len(sizes) == 1 or max(abs(a[0] - b[0]) for a in sizes for b in sizes) <= 1, sizes
    t_ours = best(lambda d: ours(d, side), images, args.repeat)
    t_naive = best(lambda d: naive(d, side), images, args.repeat)
    t_thumb = best(lambda d: naive(d, side, False), images, args.repeat)
    n = len(images)
    print(f"{n} JPEGs of 2.1-4.0 Mpx -> max side {side}, one process, best of {args.repeat}")
    print(f"odapi normalize:          {n / t_ours:7.1f} images/s")
    print(f"naive verify+convert:     {n / t_naive:7.1f} images/s  -> odapi/naive = "
          f"{t_naive / t_ours:.2f}x")
    print(f"naive verify+thumbnail:   {n / t_thumb:7.1f} images/s  -> odapi/naive-no-convert = "
          f"{t_thumb / t_ours:.2f}x (no integrity check)")


if __name__ == "__main__":
    main()
