"""Verify stage: a full decode of every image, the only integrity check that catches truncation.

`Image.verify()` passes a JPEG cut in half; `load()` with LOAD_TRUNCATED_IMAGES off does not.
Images in a non-RGB mode are converted and re-encoded; clean JPEG/PNG pass through untouched.
A rejected image goes to the quarantine list with its reason and the boxes it carried.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from PIL import Image, ImageFile

from odapi_operators.core import storage
from odapi_operators.core.manifest import ImageRecord, ImageSource, read_manifest, write_manifest
from odapi_operators.core.report import RecordError, RejectionLog, StageError

ALLOWED_FORMATS = {"JPEG", "PNG"}
ImageFile.LOAD_TRUNCATED_IMAGES = False


def check_image(path: str | Path) -> tuple[str, int, int, str]:
    """Fully decode `path`; return (format, width, height, mode) or raise ValueError."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                if image.format not in ALLOWED_FORMATS:
                    raise ValueError(f"format {image.format} not allowed "
                                     f"(allowed: {', '.join(sorted(ALLOWED_FORMATS))})")
                image.load()
                return image.format, image.width, image.height, image.mode
    except (Image.UnidentifiedImageError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as exc:
        raise ValueError(f"not a readable image: {exc}") from None
    except OSError as exc:
        raise ValueError(f"corrupt image: {exc}") from None


def _to_rgb_jpeg(path: Path, target: Path) -> None:
    with Image.open(path) as image:
        rgb = image.convert("RGB")
    with storage.atomic_write(target) as fh:
        rgb.save(fh, format="JPEG", quality=95)


def verify_record(record: ImageRecord, out_dir: Path) -> ImageRecord:
    """Check one image; return the record pointing at a verified RGB JPEG/PNG."""
    path = Path(record.source.uri)
    fmt, width, height, mode = check_image(path)
    if record.width and record.height and (record.width, record.height) != (width, height):
        raise ValueError(f"size mismatch: annotation says {record.width}x{record.height}, "
                         f"image is {width}x{height}")
    if mode != "RGB":
        path_out = out_dir / "files" / f"{record.key}.jpg"
        _to_rgb_jpeg(path, path_out)
        path = path_out
    return record.with_source(ImageSource("local", str(path)), width=width, height=height)


def verify_images(manifest: str | Path, out_dir: str | Path) -> dict:
    out = Path(out_dir)
    quarantine = RejectionLog()
    verified = []
    boxes_quarantined = 0
    for record in read_manifest(manifest):
        try:
            verified.append(verify_record(record, out))
        except ValueError as exc:
            boxes_quarantined += len(record.boxes)
            reason = f"quarantined: {exc} ({len(record.boxes)} boxes not used)"
            quarantine.add(RecordError(record.source.uri, record.key, reason).rejection)
    write_manifest(out / "manifest.jsonl", verified)
    quarantine.write(out / "quarantine.jsonl")
    summary = {"ok": len(verified), "failed": len(quarantine),
               "boxes_quarantined": boxes_quarantined,
               "manifest": str(out / "manifest.jsonl"),
               "quarantine": str(out / "quarantine.jsonl")}
    storage.write_text(out / "summary.json", json.dumps(summary, indent=2))
    if not verified:
        raise StageError(f"no image passed verification; see {summary['quarantine']}")
    return summary
