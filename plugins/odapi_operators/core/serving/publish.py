"""Push a SavedModel and move `stable` to it, with TF Serving in the loop when one is given.

One function for the push stage (`odapi push --promote`): the next version is published
(core/serving/push.py), then `stable` moves in two steps (core/serving/promote.py), both under
one hold of the model lock; with a Serving address the move waits until Serving has the
version AVAILABLE and answers a warmup request with it (core/serving/client.py). Runs in a
child process: the Serving protos import TensorFlow.
"""

from __future__ import annotations

import os
import sys
from functools import partial
from typing import Any

from odapi_operators.core import testpoints
from odapi_operators.core.serving.models_config import STABLE, ServingOptions
from odapi_operators.core.serving.promote import move_locked
from odapi_operators.core.serving.push import check_source, push_locked, write_summary
from odapi_operators.core.serving.rollback import rollback
from odapi_operators.core.serving.serving_dir import model_dir, model_lock


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _client(options: ServingOptions):
    if not (options.grpc_address or options.rest_url):
        return None
    from odapi_operators.core.serving.client import ServingClient

    return ServingClient(options.grpc_address, options.rest_url)


def confirmed_move(move, serving_base: str | os.PathLike, model_name: str,
                   version: int | None, options: ServingOptions, **kwargs: Any) -> dict:
    """`promote` or `rollback` through `move_confirmed` (live check only with an address)."""
    from odapi_operators.core.serving.client import move_confirmed

    client = _client(options)
    try:
        return move_confirmed(move, client, serving_base, model_name, version, options=options,
                              log=_log, **kwargs)
    finally:
        if client is not None:
            client.close()


def push_and_promote(saved_model: str | os.PathLike, serving_base: str | os.PathLike,
                     model_name: str, run_id: str, options: ServingOptions,
                     out_dir: str | os.PathLike | None = None, *, label: str = STABLE,
                     reason: str | None = None, by: str | None = None) -> dict:
    """Push the next version, then point `label` (`stable`, or `canary` for a canary check
    first) at it; return the push summary + move.

    One hold of the model lock for both: another push in between would stop serving this
    version (it is not labelled yet) and could garbage-collect it before the label reaches it.
    """
    check_source(saved_model, serving_base)
    with model_lock(model_dir(serving_base, model_name)):
        summary = push_locked(saved_model, serving_base, model_name, run_id, options)
        write_summary(out_dir, summary)
        _log(f"pushed {model_name} version {summary['version']} to {summary['path']}")
        testpoints.reached("push:before_promote")
        moved = confirmed_move(partial(move_locked, label=label, action="promote"),
                               serving_base, model_name, summary["version"], options,
                               reason=reason or f"promoted by run {run_id}", by=by)
    return {**summary, "label": label, label: moved["version"],
            f"previous_{label}": moved["previous"], "serving": moved["serving"]}


def roll_back(serving_base: str | os.PathLike, model_name: str, to: int | None,
              options: ServingOptions, **kwargs: Any) -> dict:
    """Move `stable` back (default: the previous stable version), confirmed when possible."""
    return confirmed_move(rollback, serving_base, model_name, to, options, **kwargs)
