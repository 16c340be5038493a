"""Roll `stable` back to an earlier version: the undo of a promotion, reversible itself.

Without `--to`, the target is the most recent earlier stable version (from the registry's
label history) that still exists, else the newest version below the current one. A target
without saved_model.pb is refused: Serving could not load it.
"""

from __future__ import annotations

import os
from typing import Callable

from odapi_operators.core.failures import Failure
from odapi_operators.core.serving import models_config as serving_config
from odapi_operators.core.serving import registry
from odapi_operators.core.serving.models_config import STABLE, ServingOptions
from odapi_operators.core.serving.promote import move_locked
from odapi_operators.core.serving.serving_dir import model_dir, model_lock, versions


class RollbackError(ValueError):
    """Nothing to roll back to, or the request makes no sense; the message says why."""
    failure = Failure.REFUSED


def previous_stable(history: list[int], current: int, available: list[int]) -> int | None:
    """The last stable version before `current` that is older than it and still exists."""
    for version in reversed(history):
        if version < current and version in available:
            return version
    older = [v for v in available if v < current]
    return older[-1] if older else None


def rollback(serving_base: str | os.PathLike, model_name: str, to: int | None = None, *,
             reason: str | None = None, by: str | None = None,
             options: ServingOptions | None = None,
             wait: Callable[[int], None] | None = None) -> dict:
    """Move `stable` of `model_name` back to `to` (default: the previous stable version)."""
    options = options or ServingOptions()
    base = os.fspath(serving_base)
    model_path = model_dir(base, model_name)
    with model_lock(model_path):
        config = serving_config.read(options.models_config_path(base))
        current = serving_config.labels(serving_config.entry(config, model_name)).get(STABLE)
        if current is None:
            raise RollbackError(f"{options.models_config_path(base)}: model {model_name!r} has "
                                "no stable label to roll back")
        available = versions(model_path)
        if to is None:
            history = registry.label_history(
                registry.read(options.registry_path(base), model_name), model_name, STABLE)
            to = previous_stable(history, current, available)
            if to is None:
                raise RollbackError(f"{model_path}: no version older than stable {current} "
                                    f"to roll back to (versions: {available})")
        if to == current:
            raise RollbackError(f"{model_path}: version {to} is already stable")
        return move_locked(base, model_name, to, label=STABLE, options=options,
                           action="rollback", reason=reason, by=by, wait=wait)
