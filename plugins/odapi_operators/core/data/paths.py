"""Resolving paths named inside annotation files without ever leaving the allowed roots."""

from __future__ import annotations

import os
from pathlib import Path


def resolve_inside(root: str | Path, name: str) -> Path:
    """`root/name`, refusing absolute names and `..` escapes (symlinks resolved too), and names
    of the root itself (".", "sub/..": a folder, never an image)."""
    if not name or os.path.isabs(name) or "\\" in name and os.path.isabs(name.replace("\\", "/")):
        raise ValueError(f"absolute path refused: {name!r} (only names relative to {root})")
    base = Path(root).resolve()
    candidate = (base / name).resolve()
    if candidate == base:
        raise ValueError(f"not a file name: {name!r} names the folder {base} itself")
    if base not in candidate.parents:
        raise ValueError(f"path outside the allowed root: {name!r} is not inside {base}")
    return candidate
