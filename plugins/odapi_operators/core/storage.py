"""One storage layer for every path the pipeline reads or writes.

Paths are strings or `Path`s; a URI scheme (`gs://...`) selects a backend. Only the local
filesystem is implemented today; an object-store backend registers itself in `_BACKENDS`
with the same small interface, so stage code never branches on where data lives.
Writes are atomic: a reader never sees half a file or half a directory.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import IO, Iterator, Protocol

PathLike = str | os.PathLike[str]


class StorageError(OSError):
    """A storage operation failed; the message names the path."""


class Backend(Protocol):
    def exists(self, path: str) -> bool: ...
    def read_bytes(self, path: str) -> bytes: ...
    def write_bytes(self, path: str, data: bytes) -> None: ...
    def list_files(self, path: str) -> list[str]: ...


def _scheme(path: PathLike) -> str:
    text = os.fspath(path)
    return text.split("://", 1)[0] if "://" in text else "file"


class LocalBackend:
    """Local (or mounted) filesystem."""

    def exists(self, path: str) -> bool:
        return os.path.exists(path)

    def read_bytes(self, path: str) -> bytes:
        return Path(path).read_bytes()

    def write_bytes(self, path: str, data: bytes) -> None:
        with atomic_write(path) as fh:
            fh.write(data)

    def list_files(self, path: str) -> list[str]:
        """Every regular file below `path`, sorted, as absolute paths."""
        root = Path(path)
        if root.is_file():
            return [str(root)]
        return sorted(str(p) for p in root.rglob("*") if p.is_file())


_BACKENDS: dict[str, Backend] = {"file": LocalBackend()}


def backend(path: PathLike) -> Backend:
    """The backend for `path`'s scheme, or a clear error for an unsupported one."""
    scheme = _scheme(path)
    try:
        return _BACKENDS[scheme]
    except KeyError:
        raise StorageError(f"{os.fspath(path)}: unsupported storage scheme '{scheme}://'") from None


def exists(path: PathLike) -> bool:
    return backend(path).exists(os.fspath(path))


def read_bytes(path: PathLike) -> bytes:
    return backend(path).read_bytes(os.fspath(path))


def write_bytes(path: PathLike, data: bytes) -> None:
    backend(path).write_bytes(os.fspath(path), data)


def read_text(path: PathLike) -> str:
    return read_bytes(path).decode("utf-8")


def write_text(path: PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def list_files(path: PathLike) -> list[str]:
    return backend(path).list_files(os.fspath(path))


def _local(path: PathLike) -> Path:
    """`path` as a local Path; object-store paths are refused (their backends write atomically)."""
    if _scheme(path) != "file":
        raise StorageError(f"{os.fspath(path)}: atomic local write on a non-local path")
    return Path(path)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _temp_sibling(path: Path) -> Path:
    # Dot-prefixed and non-numeric: ignored by globbing readers and by TF Serving.
    return path.with_name(f".tmp-{path.name}-{uuid.uuid4().hex[:8]}")


@contextlib.contextmanager
def atomic_write(path: PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary sibling of `path` for writing; rename it over `path` on success.

    On any exception the temporary file is removed and `path` is left as it was.
    """
    final = _local(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(final)
    try:
        with open(tmp, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_directory(path: PathLike, replace: bool = True) -> Iterator[Path]:
    """Yield a temporary directory that becomes `path` only when the block succeeds.

    With `replace=True` an existing `path` is swapped out (old content removed only after the
    new one is in place; between the two renames `path` briefly does not exist); with
    `replace=False` an existing `path` is an error, never overwritten.
    """
    final = _local(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; readers (e.g. Serving) need more
    try:
        yield tmp
        if final.exists():
            if not replace:
                raise StorageError(f"{final}: already exists and must not be overwritten")
            old = _temp_sibling(final)
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
