"""Hostile inputs shared by the download, verify and shard tests: a real PNG decompression
bomb and a real, tiny filesystem that fills up."""

from __future__ import annotations

import contextlib
import functools
import struct
import subprocess
import zlib
from pathlib import Path

import pytest


@functools.lru_cache(maxsize=None)
def png_bomb(side: int = 20_000) -> bytes:
    """A real PNG of side x side 1-bit pixels (400 Mpx): ~50 kB on disk, 1.2 GB as RGB."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + \
            struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
    row = b"\0" * (1 + side // 8)
    packer = zlib.compressobj(9)
    body = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1-bit grayscale
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body)
            + chunk(b"IEND", b""))


@contextlib.contextmanager
def tiny_filesystem(path: Path, size: str = "96k"):
    """A real tmpfs of `size` (needs root); skip the test when it cannot be mounted."""
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                             capture_output=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)
