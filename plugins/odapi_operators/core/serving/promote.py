"""Move a version label (`stable`, `canary`) to a pushed version, and record the move.

The label moves in Serving's two steps (serving_config.move_label): serve the version, let
Serving load it (`wait`, e.g. the Serving hook polling for AVAILABLE and sending a
prediction), then point the label at it. Without a Serving address there is nothing to wait
for: the post-export contract check already stood in for the live one.
"""

from __future__ import annotations

import os
from typing import Callable

from odapi_operators.core.serving import models_config as serving_config
from odapi_operators.core.serving import registry
from odapi_operators.core.serving.models_config import ServingOptions
from odapi_operators.core.serving.serving_dir import model_dir, model_lock, versions


def move_locked(serving_base: str | os.PathLike, model_name: str, version: int, *,
                label: str, options: ServingOptions, action: str,
                reason: str | None = None, by: str | None = None,
                wait: Callable[[int], None] | None = None) -> dict:
    """`promote` for a caller that already holds the model lock (see rollback)."""
    base = os.fspath(serving_base)
    model_path = model_dir(base, model_name)
    available = versions(model_path)
    if version not in available:
        raise FileNotFoundError(f"{model_path}/{version}: no saved_model.pb there, not a "
                                f"version Serving could load (versions: {available})")
    config_path = options.models_config_path(base)
    registry_path = options.registry_path(base)
    # Read before anything moves: a move that cannot be recorded must not happen.
    history = registry.label_history(registry.read(registry_path, model_name), model_name, label)
    before = serving_config.labels(serving_config.entry(serving_config.read(config_path),
                                                        model_name))
    previous = before.get(label)
    if previous == version and history[-1:] != [version]:  # a move killed before its record
        previous = history[-1] if history else None
    labels = serving_config.move_label(
        config_path, model_name, options.model_base_path(base, model_name), label, version,
        available, policy=options.version_policy, latest_versions=options.latest_versions,
        wait=wait)
    if history[-1:] != [version]:  # a retried move is recorded once
        registry.record_label(registry_path, model_name, label, version, previous, action,
                              reason, by)
    return {"model_name": model_name, "label": label, "version": version,
            "previous": previous, "labels": labels, "models_config": config_path}


def promote(serving_base: str | os.PathLike, model_name: str, version: int, *,
            label: str = serving_config.STABLE, options: ServingOptions | None = None,
            reason: str | None = None, by: str | None = None,
            wait: Callable[[int], None] | None = None) -> dict:
    """Point `label` at `version` (two steps); returns the labels before/after the move."""
    with model_lock(model_dir(serving_base, model_name)):
        return move_locked(serving_base, model_name, version, label=label,
                           options=options or ServingOptions(), action="promote",
                           reason=reason, by=by, wait=wait)


def remove_label_locked(serving_base: str | os.PathLike, model_name: str, label: str, *,
                        options: ServingOptions, action: str, reason: str | None = None,
                        by: str | None = None) -> int | None:
    """Remove `label` (models.config, then the registry) for a caller holding the model lock;
    returns the version it pointed at (None: it pointed nowhere, nothing is recorded)."""
    base = os.fspath(serving_base)
    removed: dict[str, int | None] = {}

    def change(config) -> None:
        model = serving_config.entry(config, model_name)
        removed["version"] = serving_config.remove_label(model, label) if model else None

    serving_config.update(options.models_config_path(base), change)
    if removed["version"] is not None:
        registry.record_label(options.registry_path(base), model_name, label, None,
                              removed["version"], action, reason, by)
    return removed["version"]
