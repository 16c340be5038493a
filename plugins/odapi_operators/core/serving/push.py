"""Push stage: publish an exported SavedModel as the next TF Serving version, atomically.

    <serving_base>/<model_name>/<version>/saved_model.pb, variables/, assets.extra/
    <serving_base>/models.config            (see serving_config.py)

Versions are integers, strictly increasing and never reused or overwritten: the highest ever
issued is kept in `.odapi-versions` and bumped before any byte is copied, so a push killed
halfway burns its number instead of leaving it to be filled twice. Serving never sees half a
version: locally it is copied under a non-numeric name (`.tmp-<version>`, ignored by Serving)
and renamed into place; on object stores everything else is uploaded first and
`saved_model.pb` last, only if absent. A re-run of the same run returns the version it already
pushed. Before any byte is copied, the version policy is checked against the versions plus the
new one (under `latest` Serving loads whatever is newest on disk, labelled or not). Then the
version is added to what models.config serves (step 1 of a label move; the label itself moves
in `promote.py` once Serving has loaded it), and versions beyond the newest `keep_versions`
are removed, except any models.config labels, lists or serves.
Pushes of one model are serialized: a lock file locally (held by `push_and_promote` until
`stable` has moved), generation preconditions on gs://.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from odapi_operators.core import storage, testpoints
from odapi_operators.core.layout import SUMMARY
from odapi_operators.core.serving import models_config as serving_config
from odapi_operators.core.serving.models_config import ServingOptions
from odapi_operators.core.serving.serving_dir import (
    RUN_MARKER,
    model_dir,
    model_lock,
    object_children,
    versions,
)

VERSIONS_FILE = ".odapi-versions"
_GS_RETRIES = 20


def _pushed_by(model_path: str, run_id: str) -> int | None:
    for version in reversed(versions(model_path)):
        marker = f"{model_path}/{version}/{RUN_MARKER}"
        if storage.exists(marker) and json.loads(storage.read_text(marker)).get("run_id") == run_id:
            return version
    return None


def _marker(source: str, run_id: str) -> bytes:
    return json.dumps({"run_id": run_id, "source": source}).encode()


# --- local: copy under a temporary name, rename --------------------------------------------


def _copy_file(src: str, dst: str) -> str:
    shutil.copy2(src, dst)
    with open(dst, "rb") as fh:  # durable before the rename publishes it
        os.fsync(fh.fileno())
    testpoints.reached("push:copying")
    return dst


def _publish_local(source: str, model_path: str, run_id: str) -> int:
    root = Path(model_path)
    ledger = root / VERSIONS_FILE
    issued = int(ledger.read_text().strip() or 0) if ledger.exists() else 0
    version = max([issued, *(int(p.name) for p in root.iterdir() if p.name.isdigit())]) + 1
    storage.write_text(ledger, str(version))  # burned from here on, whatever happens next
    tmp = root / f".tmp-{version}"
    try:
        shutil.copytree(source, tmp, copy_function=_copy_file)
        storage.write_bytes(tmp / RUN_MARKER, _marker(source, run_id))
        testpoints.reached("push:before_rename")
        os.rename(tmp, root / str(version))
        fd = os.open(root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return version


def _sweep_local(model_path: str) -> None:
    """Remove what a push killed earlier left: a half copy, a half deleted version (both under
    names Serving ignores). Only under the model lock: another push's are in use."""
    for stale in Path(model_path).glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)


def _delete_local(model_path: str, version: int) -> None:
    doomed = Path(model_path) / f".tmp-deleting-{version}"
    os.rename(Path(model_path) / str(version), doomed)  # gone for Serving in one step
    testpoints.reached("push:deleting")
    shutil.rmtree(doomed, ignore_errors=True)


# --- object stores: allocate with a precondition, saved_model.pb last --------------------


def _allocate_object(model_path: str) -> int:
    ledger = f"{model_path}/{VERSIONS_FILE}"
    for _ in range(_GS_RETRIES):
        try:
            generation = storage.stat(ledger).generation
            issued = int(storage.read_text(ledger).strip() or 0)
        except FileNotFoundError:
            generation, issued = 0, 0
        numeric = [int(v) for v, _ in object_children(model_path) if v.isdigit()]
        version = max([issued, *numeric]) + 1
        try:
            storage.write_bytes_if_generation(ledger, str(version).encode(), generation)
            return version
        except storage.PreconditionFailed:
            continue  # another push took a number: read again
    raise storage.StorageError(f"{ledger}: could not allocate a version after "
                               f"{_GS_RETRIES} attempts")


def _publish_object(source: str, model_path: str, run_id: str) -> int:
    version = _allocate_object(model_path)
    target = f"{model_path}/{version}"
    files = storage.list_files(source)
    graph = [f for f in files if os.path.relpath(f, source) == "saved_model.pb"]
    for name in [f for f in files if f not in graph]:
        storage.write_bytes(f"{target}/{os.path.relpath(name, source)}", storage.read_bytes(name))
        testpoints.reached("push:copying")
    storage.write_bytes(f"{target}/{RUN_MARKER}", _marker(source, run_id))
    testpoints.reached("push:before_rename")
    # Last, and only if absent: its presence is what makes the version complete.
    storage.write_bytes_if_generation(f"{target}/saved_model.pb", storage.read_bytes(graph[0]), 0)
    return version


def _delete_object(model_path: str, version: int) -> None:
    # storage has no delete yet, hence the client here. saved_model.pb goes first, so the
    # version stops counting as complete before any of its other files disappear.
    from google.api_core import exceptions as api

    backend = storage.backend(model_path)
    names = sorted(storage.list_files(f"{model_path}/{version}"),
                   key=lambda n: not n.endswith("/saved_model.pb"))
    for name in names:
        bucket, blob = backend.split(name)  # type: ignore[attr-defined]
        try:
            backend.client().bucket(bucket).blob(blob).delete()  # type: ignore[attr-defined]
        except api.NotFound:
            pass
        except api.GoogleAPIError as exc:
            raise storage.StorageError(f"{name}: cannot delete: {exc}") from None


# --- the stage ----------------------------------------------------------------------------


def collect_garbage(model_path: str, keep: int, protected: set[int]) -> list[int]:
    """Remove complete versions beyond the newest `keep`, never one in `protected`."""
    if keep < 1:
        raise ValueError(f"{model_path}: keep_versions must be at least 1, got {keep}")
    older = versions(model_path)[:-keep]
    doomed = [v for v in older if v not in protected]
    for version in doomed:
        (_delete_local if storage.is_local(model_path) else _delete_object)(model_path, version)
    return doomed


def _make_room(config_path: str, model_name: str, base_path: str, options: ServingOptions,
               available: list[int]) -> None:
    """Refuse, before any byte is copied, a version whose appearing would unload a labelled
    one; write a wider policy first if the current one would (see serving_config.make_room)."""
    model = serving_config.entry(serving_config.read(config_path), model_name)
    room = (options.version_policy, options.latest_versions)
    if model is not None and serving_config.make_room(model, available, *room):
        serving_config.update(config_path, lambda c: serving_config.make_room(
            serving_config.ensure_entry(c, model_name, base_path), available, *room))


def push_locked(saved_model_dir: str | os.PathLike, serving_base: str | os.PathLike,
                model_name: str, run_id: str, options: ServingOptions) -> dict:
    """`push` for a caller that already holds the model lock (push_and_promote holds it until
    `stable` has moved, so no other push can drop or delete the version in between)."""
    source = os.fspath(saved_model_dir)
    base = os.fspath(serving_base)
    model_path = model_dir(base, model_name)
    config_path = options.models_config_path(base)
    base_path = options.model_base_path(base, model_name)
    if storage.is_local(model_path):
        _sweep_local(model_path)
    version = _pushed_by(model_path, run_id)
    if version is None:
        _make_room(config_path, model_name, base_path, options, versions(model_path))
        publish = _publish_local if storage.is_local(model_path) else _publish_object
        version = publish(source, model_path, run_id)
    available = versions(model_path)
    config = serving_config.update(config_path, lambda c: serving_config.serve(
        serving_config.ensure_entry(c, model_name, base_path), version, available,
        options.version_policy, options.latest_versions))
    entry = serving_config.entry(config, model_name)
    protected = (serving_config.referenced(entry) | {version}
                 | set(serving_config.served(entry, available)))
    deleted = collect_garbage(model_path, options.keep_versions, protected)
    return {"model_name": model_name, "version": version, "path": f"{model_path}/{version}",
            "versions": versions(model_path), "labels": serving_config.labels(entry),
            "deleted": deleted, "models_config": config_path}


def check_source(saved_model_dir: str | os.PathLike, serving_base: str | os.PathLike) -> None:
    """A SavedModel to push, reachable from where the versions go."""
    source = os.fspath(saved_model_dir)
    if not storage.exists(f"{source}/saved_model.pb"):
        raise FileNotFoundError(f"{source}: no saved_model.pb to push")
    if storage.is_local(serving_base) and not storage.is_local(source):
        raise storage.StorageError(f"{source}: a local serving base needs a local SavedModel")


def write_summary(out_dir: str | os.PathLike | None, summary: dict) -> None:
    if out_dir is not None:
        storage.write_text(f"{os.fspath(out_dir)}/{SUMMARY}", json.dumps(summary, indent=2))


def push(saved_model_dir: str | os.PathLike, serving_base: str | os.PathLike, model_name: str,
         run_id: str, out_dir: str | os.PathLike | None = None,
         options: ServingOptions | None = None) -> dict:
    """Publish `saved_model_dir` as the next version, serve it alongside the labelled ones,
    drop old versions; return version, path, available versions, labels and what was deleted.

    With `out_dir` (the run's push stage folder) the result is also written there.
    """
    check_source(saved_model_dir, serving_base)
    with model_lock(model_dir(serving_base, model_name)):
        summary = push_locked(saved_model_dir, serving_base, model_name, run_id,
                              options or ServingOptions())
    write_summary(out_dir, summary)
    return summary
