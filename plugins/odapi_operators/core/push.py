"""Push stage: copy an exported SavedModel into a TF Serving model directory, atomically.

    <serving_base>/<model_name>/<version>/saved_model.pb, variables/, assets.extra/

The version is copied under a non-numeric temporary name (which Serving ignores) on the
same filesystem and renamed into place, so Serving never sees half a model. Versions are
integers, strictly increasing and never reused (the highest ever issued is kept in
`.odapi-versions`). Pushes to one model are serialized by a lock file. A re-run of the same
run returns the version it already pushed instead of pushing twice.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from pathlib import Path
from typing import Iterator

from odapi_operators.core import storage

RUN_MARKER = "assets.extra/odapi_push.json"
VERSIONS_FILE = ".odapi-versions"


@contextlib.contextmanager
def model_lock(model_dir: Path) -> Iterator[None]:
    model_dir.mkdir(parents=True, exist_ok=True)
    with open(model_dir / ".odapi-lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def versions(model_dir: Path) -> list[int]:
    """Version directories Serving would load, ascending."""
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir()
                  if p.name.isdigit() and (p / "saved_model.pb").is_file())


def _highest_issued(model_dir: Path) -> int:
    ledger = model_dir / VERSIONS_FILE
    issued = int(ledger.read_text().strip() or 0) if ledger.exists() else 0
    numeric = [int(p.name) for p in model_dir.iterdir() if p.name.isdigit()]
    return max([issued, *numeric])


def _pushed_by(model_dir: Path, run_id: str) -> int | None:
    for version in versions(model_dir):
        marker = model_dir / str(version) / RUN_MARKER
        if marker.exists() and json.loads(marker.read_text()).get("run_id") == run_id:
            return version
    return None


def push(saved_model_dir: str | Path, serving_base: str | Path, model_name: str,
         run_id: str, out_dir: str | Path | None = None) -> dict:
    """Push `saved_model_dir` as the next version of `model_name`; return version and path.

    With `out_dir` (the run's push stage folder) the result is also recorded there.
    """
    source = Path(saved_model_dir)
    if not (source / "saved_model.pb").is_file():
        raise FileNotFoundError(f"{source}: no saved_model.pb to push")
    model_dir = Path(serving_base) / model_name
    with model_lock(model_dir):
        version = _pushed_by(model_dir, run_id)
        if version is None:
            version = _highest_issued(model_dir) + 1
            storage.write_text(model_dir / VERSIONS_FILE, str(version))
            for stale in model_dir.glob(".tmp-*"):  # left by a push killed earlier
                shutil.rmtree(stale, ignore_errors=True)
            tmp = model_dir / f".tmp-{version}"
            try:
                shutil.copytree(source, tmp)
                storage.write_text(tmp / RUN_MARKER, json.dumps({"run_id": run_id,
                                                                 "source": str(source)}))
                os.rename(tmp, model_dir / str(version))
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
    summary = {"model_name": model_name, "version": version,
               "path": str(model_dir / str(version)), "versions": versions(model_dir)}
    if out_dir is not None:
        storage.write_text(Path(out_dir) / "summary.json", json.dumps(summary, indent=2))
    return summary


def production_label_map(serving_base: str | Path, model_name: str) -> str | None:
    """The label map shipped with the newest served version, if any (ids must not change)."""
    model_dir = Path(serving_base) / model_name
    for version in reversed(versions(model_dir)):
        path = model_dir / str(version) / "assets.extra" / "label_map.pbtxt"
        if path.is_file():
            return str(path)
    return None
