"""A pool of unlabeled images: listed, fetched, and read one batch at a time.

A pool is a local folder (recursively), a `gs://` prefix, or a text file naming one image per
line (http(s) URL, gs:// URI, or a path relative to the file's folder; `#` comments). Every
image becomes an `ImageRecord` without boxes, keyed exactly as ingest keys the same image
when an annotation tool's export names it (path relative to the pool folder, or the URL), so
labels coming back line up with what was sent. `source_id` holds how annotation tools should
name the image: that relative path, or the URL/URI.

Remote images go through the images stage's fetcher (`fetch.fetch_records`: retries,
magic-byte checks, a resumable store under `cache_dir`), so a re-run downloads nothing again;
local images are read where they are.
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from odapi_operators.core import storage
from odapi_operators.core.data.formats import remote_kind
from odapi_operators.core.data.ingest import IMAGE_SUFFIXES
from odapi_operators.core.data.manifest import (
    ImageRecord,
    ImageSource,
    key_from_path,
    key_from_url,
    read_manifest,
)
from odapi_operators.core.data.paths import resolve_inside
from odapi_operators.core.jsonl import parse_json_lines
from odapi_operators.core.rejections import RecordError, RejectionLog, StageError

TF_FORMATS = ("JPEG", "PNG", "GIF", "BMP")  # what the model's decoder reads


@dataclass(frozen=True)
class Pool:
    """The listed images (sorted by key) and the folder local references are relative to."""

    records: list[ImageRecord]
    root: str | None
    rejected: RejectionLog


@dataclass(frozen=True)
class PoolImage:
    """One readable pool image: identity, pixel size, perceptual hash, bytes for the model."""

    record: ImageRecord   # source: where the bytes are now (local path)
    uri: str              # where the image came from (pool path, URL, gs://)
    sha256: str
    width: int
    height: int
    dhash: int
    model_bytes: bytes    # the original bytes, or PNG when the model cannot decode them

    @property
    def key(self) -> str:
        return self.record.key


def _image_names(names: list[str]) -> list[str]:
    return [n for n in names if Path(n).suffix.lower() in IMAGE_SUFFIXES
            and not any(part.startswith(".") for part in Path(n).parts)]


def _local(root: Path, relative: str) -> ImageRecord:
    path = root / relative
    return ImageRecord(key=key_from_path(relative), source=ImageSource("local", str(path)),
                       source_id=relative, width=None, height=None, boxes=())


def _remote(uri: str, kind: str) -> ImageRecord:
    return ImageRecord(key=key_from_url(uri), source=ImageSource(kind, uri), source_id=uri,
                       width=None, height=None, boxes=())


def _from_list(path: Path, log: RejectionLog) -> list[ImageRecord]:
    records = []
    for number, line in enumerate(storage.read_text(path).splitlines(), 1):
        name = line.strip()
        if not name or name.startswith("#"):
            continue
        try:
            kind = remote_kind(name)
            if kind:
                records.append(_remote(name, kind))
            else:
                resolved = resolve_inside(path.parent, name)
                records.append(_local(path.parent, str(resolved.relative_to(
                    path.parent.resolve()))))
        except ValueError as exc:
            log.add(RecordError(str(path), f"line {number}", str(exc)).rejection)
    return records


def list_pool(pool: str | os.PathLike[str]) -> Pool:
    """Every image of `pool` (folder, gs:// prefix or list file), one record per key."""
    text, log = os.fspath(pool), RejectionLog()
    if text.startswith("gs://"):
        records = [_remote(uri, "gs") for uri in _image_names(storage.list_files(text))]
        root = None
    elif os.path.isdir(text):
        root = str(Path(text).resolve())
        names = [os.path.relpath(p, root) for p in storage.list_files(root)]
        records = [_local(Path(root), name) for name in _image_names(names)]
    elif os.path.isfile(text):
        root = str(Path(text).resolve().parent)
        records = _from_list(Path(text).resolve(), log)
    else:
        raise StageError(f"{text}: no such pool (a folder, a gs:// prefix or a list file)")
    unique: dict[str, ImageRecord] = {}
    for record in records:
        if record.key in unique:
            log.add(RecordError(text, record.source_id, f"duplicate image: key {record.key} "
                                f"already given by {unique[record.key].source_id}").rejection)
        else:
            unique[record.key] = record
    return Pool([unique[k] for k in sorted(unique)], root, log)


def fetch_remote(pool: Pool, cache_dir: str | os.PathLike[str], policy=None) -> dict[str, str]:
    """{key: local path} of the pool's remote images, stored under `cache_dir` (resumable);
    failures are added to `pool.rejected`."""
    from odapi_operators.core.data.fetch import fetch_records

    remote = [r for r in pool.records if r.source.kind != "local"]
    if not remote:
        return {}
    cache = Path(cache_dir)
    try:
        fetch_records(lambda: remote, cache, files_dir=cache / "files", max_failed_share=1.0,
                      policy=policy)
    except StageError:
        pass  # nothing could be fetched: every image is in failures.jsonl, reported below
    for failure in parse_json_lines(storage.read_text(cache / "failures.jsonl"), str(cache)):
        pool.rejected.add(RecordError(failure["file"], failure["record"],
                                      failure["reason"]).rejection)
    return {r.key: r.source.uri for r in read_manifest(cache / "manifest.jsonl")}


def dhash(image) -> int:
    """64-bit difference hash of a Pillow image: 9x8 grey, one bit per horizontal step."""
    from PIL import Image

    small = image.convert("L").resize((9, 8), Image.Resampling.LANCZOS)
    pixels = list(small.getdata())
    bits = 0
    for row in range(8):
        for col in range(8):
            bits = (bits << 1) | (pixels[row * 9 + col] > pixels[row * 9 + col + 1])
    return bits


def describe(record: ImageRecord, uri: str, data: bytes) -> PoolImage:
    """Size, hashes and model bytes of one image; ValueError if it cannot be decoded."""
    from odapi_operators.core.data.normalize import NormalizeOptions, open_checked

    image, fmt = open_checked(data, NormalizeOptions().resolved())
    with image:
        width, height = image.size
        image.draft("RGB", (64, 64))  # JPEG: decode at 1/8 scale, plenty for a 9x8 hash
        try:
            image.load()
        except OSError as exc:
            raise ValueError(f"corrupt image: {exc}") from None
        perceptual = dhash(image)
        model_bytes = data
        if fmt not in TF_FORMATS:
            from PIL import Image

            buffer = io.BytesIO()
            with Image.open(io.BytesIO(data)) as full:
                full.convert("RGB").save(buffer, "PNG")
            model_bytes = buffer.getvalue()
    return PoolImage(record, uri, hashlib.sha256(data).hexdigest(), width, height, perceptual,
                     model_bytes)


def read_pool(pool: Pool, fetched: dict[str, str]) -> Iterator[PoolImage]:
    """Each readable image in key order; unreadable ones are added to `pool.rejected`."""
    for record in pool.records:
        uri = record.source.uri
        path = uri if record.source.kind == "local" else fetched.get(record.key)
        if path is None:
            continue  # its fetch failure is reported already
        try:
            data = storage.read_bytes(path)
            yield describe(record.with_source(ImageSource("local", path)), uri, data)
        except (OSError, ValueError) as exc:
            pool.rejected.add(RecordError(uri, record.key, f"unreadable image: {exc}").rejection)
