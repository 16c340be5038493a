"""The TF Serving model directory: where a model's versions live and which one serves.

    <serving_base>/<model_name>/<version>/saved_model.pb, variables/, assets.extra/
    <serving_base>/<model_name>/.odapi-versions   highest version ever issued (push.py)
    <serving_base>/models.config                  which versions load, labels (models_config.py)

Every module that reads this folder (push, promote, rollback, warm start, the predictors, the
operators) asks here; none spells these paths itself.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

from odapi_operators.core import storage
from odapi_operators.core.model.saved_model import ASSETS_EXTRA, LABEL_MAP_FILE, extra_file
from odapi_operators.core.serving import models_config as serving_config
from odapi_operators.core.serving.models_config import ServingOptions

RUN_MARKER = f"{ASSETS_EXTRA}/odapi_push.json"  # which run pushed a version (re-runs reuse it)


def model_dir(serving_base: str | os.PathLike, model_name: str) -> str:
    """`<serving_base>/<model_name>`; a name that is not one plain folder name is refused."""
    return f"{os.fspath(serving_base).rstrip('/')}/{serving_config.plain_model_name(model_name)}"


@contextlib.contextmanager
def model_lock(model_path: str | os.PathLike) -> Iterator[None]:
    """Serialize changes to one model (push, label moves, rollback). Object stores: no-op,
    their writes are guarded by generation preconditions instead."""
    if not storage.is_local(model_path):
        yield
        return
    with storage.file_lock(Path(model_path) / "odapi"):  # .odapi.lock in the model dir
        yield


def versions(model_path: str | os.PathLike) -> list[int]:
    """Complete versions (numeric directory with saved_model.pb), ascending."""
    if storage.is_local(model_path):
        root = Path(model_path)
        if not root.is_dir():
            return []
        return sorted(int(p.name) for p in root.iterdir()
                      if p.name.isdigit() and (p / "saved_model.pb").is_file())
    return sorted({int(v) for v, rest in object_children(model_path)
                   if v.isdigit() and rest == "saved_model.pb"})


def object_children(model_path: str | os.PathLike) -> list[tuple[str, str]]:
    prefix = os.fspath(model_path).rstrip("/") + "/"
    return [tuple(name[len(prefix):].split("/", 1)) for name in storage.list_files(prefix)
            if "/" in name[len(prefix):]]


def production_version(serving_base: str | os.PathLike, model_name: str,
                       options: ServingOptions | None = None) -> int | None:
    """The version Serving answers with: `stable` in models.config, else the newest version.

    This is the gate's baseline; None means no model was ever pushed (first model).
    """
    options = options or ServingOptions()
    available = versions(model_dir(serving_base, model_name))
    config = serving_config.read(options.models_config_path(os.fspath(serving_base)))
    stable = serving_config.labels(serving_config.entry(config, model_name)).get(
        serving_config.STABLE)
    if stable in available:
        return stable
    return available[-1] if available else None


def production_label_map(serving_base: str | os.PathLike, model_name: str) -> str | None:
    """The label map shipped with the newest version, if any: class ids must never change,
    and the newest version knows every class ever added (even if `stable` was rolled back)."""
    path = model_dir(serving_base, model_name)
    for version in reversed(versions(path)):
        label_map = extra_file(f"{path}/{version}", LABEL_MAP_FILE)
        if storage.exists(label_map):
            return label_map
    return None
