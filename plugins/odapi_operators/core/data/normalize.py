"""One image's bytes -> checked, upright, RGB, size-capped bytes (or "keep the original").

A full decode is the integrity check: `Image.verify()` passes a JPEG cut in half, `load()` with
LOAD_TRUNCATED_IMAGES off does not. The format comes from the magic bytes and only the allowed
decoders are tried (Pillow would otherwise happily hand a file to e.g. its EPS plugin). The
decompression-bomb guard stays on: Pillow's warning above `max_pixels` counts as an error too.

Order (../shared/notes/images.md): open -> check format -> draft -> load -> transpose -> resize
-> encode. JPEG draft mode lets libjpeg decode at 1/2, 1/4 or 1/8 scale, several times faster
than decoding in full and shrinking after. An RGB JPEG/PNG needing no change is passed through
untouched (cheaper and lossless); anything else is re-encoded as JPEG.
"""

from __future__ import annotations

import hashlib
import io
import math
import warnings
from dataclasses import dataclass, field

from PIL import Image, ImageFile

from odapi_operators.core.data.content import IMAGE_FORMATS, describe_head, sniff_format
from odapi_operators.core.data.orientation import EXIF_ORIENTATION_TAG, orientation_ops

ImageFile.LOAD_TRUNCATED_IMAGES = False
PASS_THROUGH_FORMATS = ("JPEG", "PNG")  # what TF's decode_image reads natively


@dataclass(frozen=True)
class NormalizeOptions:
    max_side: int | None = None
    allowed_formats: frozenset[str] = field(default_factory=lambda: frozenset(IMAGE_FORMATS))
    max_pixels: int | None = None  # None: Pillow's MAX_IMAGE_PIXELS in the calling process
    jpeg_quality: int = 95

    def resolved(self) -> "NormalizeOptions":
        """Pin `max_pixels` now, so worker processes use the caller's limit."""
        if self.max_pixels is not None:
            return self
        return NormalizeOptions(self.max_side, self.allowed_formats, Image.MAX_IMAGE_PIXELS,
                                self.jpeg_quality)


@dataclass(frozen=True)
class Normalized:
    data: bytes | None          # None: the input bytes are the output
    format: str                 # format of the output: JPEG or PNG
    width: int
    height: int
    stored_size: tuple[int, int]
    ops: tuple[int, ...]        # transposes applied to the pixels (apply them to the boxes)
    resized: bool
    sha256: str                 # of the output bytes


def open_checked(data: bytes, options: NormalizeOptions) -> tuple[Image.Image, str]:
    """Open with the bomb guard on; ValueError names what is wrong."""
    fmt = sniff_format(data[:16])
    if fmt is None:
        raise ValueError(f"not a readable image: content starts with {describe_head(data)}")
    if fmt not in options.allowed_formats:
        raise ValueError(f"format {fmt} not allowed "
                         f"(allowed: {', '.join(sorted(options.allowed_formats))})")
    try:
        return Image.open(io.BytesIO(data), formats=[fmt]), fmt
    except (Image.UnidentifiedImageError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as exc:
        raise ValueError(f"not a readable image: {exc}") from None
    except OSError as exc:
        raise ValueError(f"corrupt image: {exc}") from None


def _to_rgb(image: Image.Image) -> Image.Image:
    """CMYK, gray, palette, 16-bit and alpha images -> RGB (transparency over white)."""
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I"):  # 16/32-bit gray: keep the top 8 bits, not a clipped 255
        import numpy as np  # here: a verify that decodes nothing should not pay its import

        array = np.asarray(image).astype(np.uint32) >> 8
        image = Image.fromarray(np.clip(array, 0, 255).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or \
            (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


def _target(size: tuple[int, int], max_side: int | None) -> tuple[int, int] | None:
    width, height = size
    if not max_side or max(width, height) <= max_side:
        return None
    scale = max_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def normalize(data: bytes, rotation: int = 0, options: NormalizeOptions | None = None,
              expected_size: tuple[int, int] | None = None) -> Normalized:
    """Decode, check and normalize one image; raises ValueError with the reason to report.

    `expected_size` is the annotation's (width, height) of the stored pixels, if it gives one.
    """
    options = (options or NormalizeOptions()).resolved()
    previous_limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = options.max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image, fmt = open_checked(data, options)
            with image:
                return _normalize_open(data, image, fmt, rotation, options, expected_size)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ValueError(f"not a readable image: {exc}") from None
    finally:
        Image.MAX_IMAGE_PIXELS = previous_limit


def _normalize_open(data: bytes, image: Image.Image, fmt: str, rotation: int,
                    options: NormalizeOptions, expected_size) -> Normalized:
    stored = image.size
    if expected_size and all(expected_size) and tuple(expected_size) != stored:
        raise ValueError(f"size mismatch: annotation says {expected_size[0]}x{expected_size[1]}, "
                         f"image is {stored[0]}x{stored[1]}")
    ops = orientation_ops(image.getexif().get(EXIF_ORIENTATION_TAG), rotation)
    target = _target(stored, options.max_side)
    if target and fmt == "JPEG":
        image.draft("RGB", (math.ceil(target[0]), math.ceil(target[1])))
    try:
        image.load()
    except OSError as exc:
        raise ValueError(f"corrupt image: {exc}") from None
    mode = image.mode
    if fmt in PASS_THROUGH_FORMATS and mode == "RGB" and not ops and not target:
        return Normalized(None, fmt, *stored, stored, (), False, hashlib.sha256(data).hexdigest())
    pixels = _to_rgb(image)
    for op in ops:
        pixels = pixels.transpose(op)
    if target:
        final = (target[1], target[0]) if _swaps(ops) else target
        if pixels.size != final:  # after draft, less than 2x is left: bilinear is enough
            pixels = pixels.resize(final, Image.Resampling.BILINEAR)
    out = io.BytesIO()
    pixels.save(out, "JPEG", quality=options.jpeg_quality)
    encoded = out.getvalue()
    return Normalized(encoded, "JPEG", *pixels.size, stored, ops, bool(target),
                      hashlib.sha256(encoded).hexdigest())


def _swaps(ops: tuple[int, ...]) -> bool:
    """True when the transposes exchange width and height."""
    swapping = {Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_270,
                Image.Transpose.TRANSPOSE, Image.Transpose.TRANSVERSE}
    return sum(op in swapping for op in ops) % 2 == 1
