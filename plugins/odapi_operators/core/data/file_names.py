"""File names of stored images (`files/<key><ext>`) that fit the file system, whatever the key.

Keys flattened from deep export paths can pass a file system's name limit (255 bytes on
ext4, xfs, tmpfs), and atomic writes add a temporary prefix and suffix to the name. A name
that would not fit keeps the start of its key and gains a hash of the whole key instead of
the rest: the same key always gives the same name (a re-run finds its files), two keys do not
share one (64 bits of hash, and `~` is not in keys made by `manifest.key_from_*`), and the
extension stays.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

TEMP_AFFIXES = 32  # room for a temporary sibling's affixes: `.tmp-<name>-<host>-<pid>-<8 hex>`
DIGEST_CHARS = 16
MAX_SUFFIX = 32  # bytes of an extension kept in a shortened name


def name_limit(folder: str | Path) -> int:
    """Longest stored name, in bytes, for `folder`'s file system (an existing folder)."""
    try:
        name_max = os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        name_max = 255
    return name_max - TEMP_AFFIXES


def fitting_name(key: str, suffix: str, limit: int) -> str:
    """`<key><suffix>`, or when longer than `limit` bytes, `<start of key>~<hash><suffix>`."""
    name = f"{key}{suffix}"
    if len(name.encode()) <= limit:
        return name
    digest = hashlib.sha256(key.encode()).hexdigest()[:DIGEST_CHARS]
    suffix = _cut(suffix, MAX_SUFFIX)
    room = limit - len(f"~{digest}{suffix}".encode())
    return f"{_cut(key, room)}~{digest}{suffix}"


def _cut(text: str, size: int) -> str:
    """At most `size` bytes of `text`'s start, never half a character."""
    return text.encode()[:max(size, 0)].decode("utf-8", "ignore")
