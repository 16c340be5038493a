"""One storage layer for every path the pipeline reads or writes.

Paths are strings or `Path`s; a URI scheme selects a backend registered in `_BACKENDS`: the
local filesystem, and Google Cloud Storage for `gs://bucket/name`. All backends share one small
interface, so stage code never branches on where data lives.
Writes are atomic: a reader never sees half a file or half a directory (local writes rename a
finished temporary file; object writes are atomic by nature).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import os
import re
import shutil
import socket
import uuid
from pathlib import Path
from typing import IO, Any, Iterator, NamedTuple, Protocol

PathLike = str | os.PathLike[str]


class StorageError(OSError):
    """A storage operation failed; the message names the path."""


class PreconditionFailed(StorageError):
    """A conditional write lost a race: the object changed since the generation it was based on."""


class FileStat(NamedTuple):
    """What completeness checks compare: `generation` changes whenever the content is rewritten."""

    size: int
    mtime: float  # seconds since the epoch (UTC): local mtime, or the object's `updated`
    generation: int  # local: mtime in ns; gs: the object generation


class Backend(Protocol):
    def exists(self, path: str) -> bool: ...
    def read_bytes(self, path: str) -> bytes: ...
    def write_bytes(self, path: str, data: bytes) -> None: ...
    def list_files(self, path: str) -> list[str]: ...
    def stat(self, path: str) -> FileStat: ...
    def list_stats(self, path: str) -> dict[str, FileStat]: ...


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

    def stat(self, path: str) -> FileStat:
        st = os.stat(path)
        return FileStat(st.st_size, st.st_mtime, st.st_mtime_ns)

    def list_stats(self, path: str) -> dict[str, FileStat]:
        stats = {}
        for name in self.list_files(path):
            with contextlib.suppress(FileNotFoundError):  # removed since the listing
                stats[name] = self.stat(name)
        return stats


class GCSBackend:
    """Google Cloud Storage. `gs://bucket/a/b` is object `a/b`; a "folder" is a name prefix.

    The client is created on first use, once per process (a forked worker makes its own), and
    honours STORAGE_EMULATOR_HOST; with an emulator it uses anonymous credentials.
    """

    def __init__(self) -> None:
        self._client: Any = None
        self._client_key: tuple | None = None

    def client(self) -> Any:
        key = (os.getpid(), os.environ.get("STORAGE_EMULATOR_HOST"))
        if self._client_key != key:
            from google.cloud import storage as gcs

            if key[1]:
                from google.auth.credentials import AnonymousCredentials

                project = os.environ.get("GOOGLE_CLOUD_PROJECT", "odapi-emulator")
                self._client = gcs.Client(project=project, credentials=AnonymousCredentials())
            else:
                self._client = gcs.Client()
            self._client_key = key
        return self._client

    @staticmethod
    def split(path: str) -> tuple[str, str]:
        bucket, _, name = path[len("gs://"):].partition("/")
        if not bucket:
            raise StorageError(f"{path}: no bucket in gs:// path")
        return bucket, name

    @contextlib.contextmanager
    def _errors(self, path: str) -> Iterator[None]:
        """Google, auth and transport errors become OSErrors that name the path."""
        from google.api_core import exceptions as api
        from google.auth.exceptions import GoogleAuthError
        from requests.exceptions import RequestException

        try:
            yield
        except api.NotFound:
            raise FileNotFoundError(errno.ENOENT, "no such object", path) from None
        except api.PreconditionFailed:
            raise PreconditionFailed(f"{path}: changed since the generation read") from None
        except (api.GoogleAPIError, GoogleAuthError, RequestException) as exc:
            raise StorageError(f"{path}: {type(exc).__name__}: {exc}") from None

    def _blob(self, path: str) -> Any:
        bucket, name = self.split(path)
        if not name:
            raise StorageError(f"{path}: names a bucket, not an object")
        return self.client().bucket(bucket).blob(name)

    def exists(self, path: str) -> bool:
        """An object, or a "folder" holding at least one object, or a bucket."""
        bucket, name = self.split(path)
        with self._errors(path):
            if not name:
                return self.client().bucket(bucket).exists()
            if self._blob(path).exists():
                return True
            return any(self.client().list_blobs(bucket, prefix=name.rstrip("/") + "/",
                                                max_results=1))

    def read_bytes(self, path: str) -> bytes:
        with self._errors(path):
            return self._blob(path).download_as_bytes()

    def write_bytes(self, path: str, data: bytes, if_generation_match: int | None = None) -> int:
        """Upload `data`; returns the new generation. `if_generation_match=0`: only if absent."""
        with self._errors(path):
            blob = self._blob(path)
            blob.upload_from_string(data, if_generation_match=if_generation_match)
        return int(blob.generation)

    def stat(self, path: str) -> FileStat:
        bucket, name = self.split(path)
        with self._errors(path):
            blob = self.client().bucket(bucket).get_blob(name) if name else None
        if blob is None:
            raise FileNotFoundError(errno.ENOENT, "no such object", path)
        return self._file_stat(blob)

    def list_files(self, path: str) -> list[str]:
        return list(self.list_stats(path))

    def list_stats(self, path: str) -> dict[str, FileStat]:
        """The object `path` itself, or every object below it, from one listing, sorted by name."""
        bucket, name = self.split(path)
        name = name.rstrip("/")
        with self._errors(path):
            blobs = list(self.client().list_blobs(bucket, prefix=name))
        below = name + "/" if name else ""
        return {f"gs://{bucket}/{b.name}": self._file_stat(b)
                for b in sorted(blobs, key=lambda b: b.name)
                if (b.name == name or b.name.startswith(below)) and not b.name.endswith("/")}

    @staticmethod
    def _file_stat(blob: Any) -> FileStat:
        return FileStat(int(blob.size or 0), blob.updated.timestamp(), int(blob.generation))


_BACKENDS: dict[str, Backend] = {"file": LocalBackend(), "gs": GCSBackend()}


def is_local(path: PathLike) -> bool:
    """True for local (or mounted) paths, where file locks and renames work."""
    return _scheme(path) == "file"


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


def open_read(path: PathLike) -> IO[bytes]:
    """`path` as a binary stream: a local file is read as the stream is consumed (a reader
    that stops early reads no further); an object's bytes are fetched whole."""
    if is_local(path):
        return open(path, "rb")
    return io.BytesIO(read_bytes(path))


def read_text(path: PathLike) -> str:
    return read_bytes(path).decode("utf-8")


def write_text(path: PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def list_files(path: PathLike) -> list[str]:
    return backend(path).list_files(os.fspath(path))


def stat(path: PathLike) -> FileStat:
    """Size, modification time and generation; FileNotFoundError if `path` is missing."""
    return backend(path).stat(os.fspath(path))


def list_stats(path: PathLike) -> dict[str, FileStat]:
    """`list_files` with each file's stat, from one listing where the backend allows."""
    return backend(path).list_stats(os.fspath(path))


def write_bytes_if_generation(path: PathLike, data: bytes, generation: int) -> int:
    """Write only if the object is still at `generation` (0: absent); returns the new one.

    For read-modify-write on object stores without a lock; raises PreconditionFailed when
    another writer got there first. Local files have no generations (use a file lock there).
    """
    target = backend(path)
    if not isinstance(target, GCSBackend):
        raise StorageError(f"{os.fspath(path)}: generation preconditions need an object store")
    return target.write_bytes(os.fspath(path), data, if_generation_match=generation)


def _local(path: PathLike) -> Path:
    """`path` as a local Path; object-store paths are refused (their backends write atomically)."""
    if not is_local(path):
        raise StorageError(f"{os.fspath(path)}: atomic local write on a non-local path")
    return Path(path)


@contextlib.contextmanager
def file_lock(path: PathLike) -> Iterator[None]:
    """Hold an exclusive lock on `path` (via its sibling `.<name>.lock`; local paths only).

    The kernel releases it when the holder dies, even by SIGKILL, so no stale locks.
    """
    target = _local(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.with_name(f".{target.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


# `.tmp-<name>-<host>-<pid>-<8 chars>`: <host> is a 4-hex tag of the writer's host name
_TEMPORARY = re.compile(r"^\.tmp-.+-([0-9a-f]{4})-(\d+)-[0-9a-z_]{8}$")
_HOST = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:4]


def temp_sibling(path: Path) -> Path:
    """A temporary name next to `path`, dot-prefixed and non-numeric (ignored by globbing
    readers and by TF Serving), naming its writer (host tag and pid) so `sweep_temporaries`
    can tell a dead writer's leftover from a live writer's file."""
    return path.with_name(f".tmp-{path.name}-{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _alive(pid: int) -> bool:
    """Whether process `pid` still runs; a zombie (dead, not yet reaped: a container's init
    may never reap it) does not."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return stat.rsplit(")", 1)[-1].split()[0] not in ("Z", "X")


def sweep_temporaries(folder: PathLike) -> int:
    """Remove, under a local `folder`, the temporaries of writers that are gone (a stage
    killed mid-write); return how many. A live writer's temporaries stay, and so do those
    of another host's writers (a folder shared by workers on several hosts): this host
    cannot tell whether they still run."""
    if not is_local(folder):
        return 0
    root = _local(folder)
    # temporaries of the folder itself (written whole by `atomic_directory`) sit beside it
    removed = sum(_remove_if_dead(path) for path in root.parent.glob(f".tmp-{root.name}-*"))
    for parent, dirs, files in os.walk(root):
        for name in [*dirs, *files]:
            if _remove_if_dead(Path(parent) / name):
                removed += 1
                if name in dirs:
                    dirs.remove(name)  # gone: nothing to walk into
    return removed


def _remove_if_dead(path: Path) -> bool:
    """Remove `path` if it is a temporary whose writer is gone; whether it was."""
    match = _TEMPORARY.match(path.name)
    if match is None or match.group(1) != _HOST or _alive(int(match.group(2))):
        return False
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
    return True


@contextlib.contextmanager
def atomic_write(path: PathLike, mode: str = "wb", durable: bool = True) -> Iterator[IO]:
    """Open a temporary sibling of `path` for writing; rename it over `path` on success.

    On any exception the temporary file is removed and `path` is left as it was. Without
    `durable` the data is not forced to disk before the rename: only for hints whose reader
    checks every line and whose loss in a power cut costs a redo, never a wrong result.
    """
    final = _local(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(final)
    try:
        with open(tmp, mode) as fh:
            yield fh
            if durable:
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
    tmp = temp_sibling(final)
    tmp.mkdir(mode=0o777)  # umask applies, as for any folder (readers, e.g. Serving, need it)
    try:
        yield tmp
        if final.exists():
            if not replace:
                raise StorageError(f"{final}: already exists and must not be overwritten")
            old = temp_sibling(final)
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
