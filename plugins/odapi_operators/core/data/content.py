"""What a body of bytes really is: image format by magic bytes, never by name or Content-Type.

An HTML error page served with `200 image/jpeg` is the classic silent poison of scraped
datasets; sniffing the first bytes catches it before anything is stored.
"""

from __future__ import annotations

import hashlib

# (offset, signature, Pillow format name)
_SIGNATURES = (
    (0, b"\xff\xd8\xff", "JPEG"),
    (0, b"\x89PNG\r\n\x1a\n", "PNG"),
    (0, b"GIF87a", "GIF"),
    (0, b"GIF89a", "GIF"),
    (8, b"WEBP", "WEBP"),  # after b"RIFF" + 4-byte size
    (0, b"BM", "BMP"),
)
IMAGE_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP")
EXTENSIONS = {"JPEG": ".jpg", "PNG": ".png", "GIF": ".gif", "WEBP": ".webp", "BMP": ".bmp"}
SNIFF_BYTES = 16


class ContentError(ValueError):
    """The bytes are not what the record says; `kind` is `not an image` or `md5 mismatch`."""

    def __init__(self, kind: str, detail: str):
        super().__init__(f"{kind}: {detail}")
        self.kind, self.detail = kind, detail


def sniff_format(head: bytes) -> str | None:
    """The image format named by `head`'s magic bytes, or None."""
    for offset, signature, name in _SIGNATURES:
        if head[offset:offset + len(signature)] == signature:
            if name == "WEBP" and head[:4] != b"RIFF":
                continue
            return name
    return None


def describe_head(head: bytes) -> str:
    """A short printable preview of unrecognised content, for a failure reason."""
    text = head[:24].decode("latin-1")
    return repr("".join(c if c.isprintable() else "." for c in text))


def require_image(head: bytes) -> str:
    """The format of `head`, or ContentError naming what the content looks like instead."""
    fmt = sniff_format(head)
    if fmt is None:
        raise ContentError("not an image", f"content starts with {describe_head(head)} "
                                           f"(expected {'/'.join(IMAGE_FORMATS)} magic bytes)")
    return fmt


def check_md5(digest: str, expected: str | None) -> None:
    if expected and digest.lower() != expected.lower():
        raise ContentError("md5 mismatch", f"expected {expected.lower()}, got {digest}")


def md5_hex(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()
