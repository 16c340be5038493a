"""The canary check: a candidate labelled `canary` must answer like `stable` before `stable`
moves to it.

The requests are the canary version's warmup requests (assets.extra, written by the export
from the first val images) and `promote.canary_images` further val images. Each goes to the
`canary` and the `stable` label in turn, through TF Serving (client.py); the warmup requests
go to stable as they are when both versions take the same input type, the val images are
rendered for each version's own input type. The canary passes when the 95th percentile of
its answer times is within `promote.canary_p95_ms` and its detections agree with stable's:
per request 1 - the disagreement active learning measures (labeling/selection.py: boxes
above a score threshold matched greedily by IoU, a class flip counting as a miss), averaged.
The first model ever has no stable to agree with: only its latency is checked.

Then a pass moves `stable` to the version (a confirmed move) and removes `canary`, unless the
approver chose "canary only": then both labels stay. A failure leaves `stable` untouched
and removes `canary` (under the `labelled` version policy Serving stops loading the
version). The verdict goes into decision.json, the label moves into the registry.
"""

from __future__ import annotations

import os
import time
from functools import partial
from typing import Callable

import numpy as np

from odapi_operators.core import storage
from odapi_operators.core.config import PromoteConfig
from odapi_operators.core.evaluation import decision as decision_file
from odapi_operators.core.failures import Failure
from odapi_operators.core.model.detector import saved_model_info, unbatch
from odapi_operators.core.model.saved_model import (
    INPUT_NAME,
    WARMUP_FILE,
    extra_file,
    read_warmup,
    request_input,
)
from odapi_operators.core.serving import models_config as serving_config
from odapi_operators.core.serving.client import ServingClient, ServingError, ServingUnreachable
from odapi_operators.core.serving.models_config import CANARY, STABLE, ServingOptions
from odapi_operators.core.serving.promote import move_locked, remove_label_locked
from odapi_operators.core.serving.serving_dir import model_dir, model_lock

Pair = tuple[np.ndarray, "np.ndarray | None"]  # (canary's input, stable's input or None)


class CanaryFailed(RuntimeError):
    """The canary check failed: stable was left alone (the message says why)."""
    failure = Failure.REFUSED


def requests(canary_dir: str, stable_dir: str | None, examples: list[bytes]) -> list[Pair]:
    """The canary's warmup requests and one request per val example, each with its
    counterpart for stable (None where stable cannot take it)."""
    canary_type, _ = saved_model_info(canary_dir)
    stable_type = saved_model_info(stable_dir)[0] if stable_dir else None
    if canary_type is None:
        raise ValueError(f"{canary_dir}: no input type in assets.extra (not an odapi export)")
    warmup_file = extra_file(canary_dir, WARMUP_FILE)
    warmup = read_warmup(warmup_file) if storage.exists(warmup_file) else []
    same = stable_type == canary_type
    pairs: list[Pair] = [(array, array if same else None) for array in warmup]
    return pairs + [(request_input(example, canary_type),
                     request_input(example, stable_type) if stable_type else None)
                    for example in examples]


def _timed(call: Callable[[], dict]) -> tuple[dict, float]:
    start = time.perf_counter()
    answer = call()
    return answer, (time.perf_counter() - start) * 1000


def _p95(times: list[float]) -> float | None:
    return round(float(np.percentile(times, 95)), 1) if times else None


def shadow(client: ServingClient, model_name: str, pairs: list[Pair],
           normalized: tuple[bool | None, bool | None], options: PromoteConfig) -> dict:
    """Send every pair to `canary` and `stable`; the verdict with its numbers and reasons."""
    canary_ms, stable_ms, agreement = [], [], []
    for canary_input, stable_input in pairs:
        answer, elapsed = _timed(partial(client.predict, model_name,
                                         {INPUT_NAME: canary_input}, label=CANARY))
        canary_ms.append(elapsed)
        if stable_input is None:
            continue
        reference, elapsed = _timed(partial(client.predict, model_name,
                                            {INPUT_NAME: stable_input}, label=STABLE))
        stable_ms.append(elapsed)
        from odapi_operators.core.labeling.selection import disagreement

        [ours], [theirs] = unbatch(answer, normalized[0]), unbatch(reference, normalized[1])
        agreement.append(1.0 - disagreement(theirs, ours, options.canary_score_threshold,
                                            options.canary_match_iou)["disagreement"])
    p95 = _p95(canary_ms)
    mean = round(float(np.mean(agreement)), 4) if agreement else None
    reasons = []
    if p95 is not None and p95 > options.canary_p95_ms:
        reasons.append(f"p95 answer time {p95:g} ms above promote.canary_p95_ms "
                       f"{options.canary_p95_ms:g} (stable: {_p95(stable_ms)} ms)")
    if mean is not None and mean < options.canary_min_agreement:
        reasons.append(f"agreement with stable {mean:.3f} below promote.canary_min_agreement "
                       f"{options.canary_min_agreement:g} over {len(agreement)} requests")
    notes = [] if agreement else ["no stable answers to compare with: latency checked only"]
    return {"passed": not reasons, "reason": "; ".join(reasons) or "within budget and in "
            "agreement with stable", "requests": len(pairs), "p95_ms": p95,
            "stable_p95_ms": _p95(stable_ms), "agreement": mean, "compared": len(agreement),
            "notes": notes}


def _labels(base: str, model_name: str, options: ServingOptions) -> dict[str, int]:
    config = serving_config.read(options.models_config_path(base))
    return serving_config.labels(serving_config.entry(config, model_name))


def check_canary(serving: ServingOptions, base: str, model_name: str, version: int | None,
                 examples: list[bytes], options: PromoteConfig, *,
                 decision_path: str | os.PathLike | None = None,
                 log: Callable[[str], None] = print) -> dict:
    """Check the `canary` version against `stable` through Serving, then move or clear the
    labels (see the module docstring); the approval in `decision_path`, if any, says whether
    `stable` may move and is named in the registry. Raises CanaryFailed after recording a
    failure."""
    from odapi_operators.core.serving.client import send_config
    from odapi_operators.core.serving.publish import confirmed_move

    if not (serving.grpc_address or serving.rest_url):
        raise ValueError("promote.canary needs a running TF Serving: set serving.grpc_address "
                         "or serving.rest_url (in Airflow: the tf_serving_default connection)")
    decision = decision_file.read(decision_path) if decision_path else {}
    done = decision.get("canary")
    if done and done.get("version") == version and "stable" in done:  # a retry
        log(f"canary {model_name} version {version} was checked already: {done}")
        if not done["passed"]:
            raise CanaryFailed(_failure(model_name, done))
        return done
    labels = _labels(base, model_name, serving)
    version = version if version is not None else labels.get(CANARY)
    if version is None or labels.get(CANARY) != version:
        raise ValueError(f"{serving.models_config_path(base)}: {model_name} version {version} "
                         f"is not labelled canary (labels: {labels})")
    stable = labels.get(STABLE)
    root = model_dir(base, model_name)
    stable_dir = f"{root}/{stable}" if stable is not None and stable != version else None
    pairs = requests(f"{root}/{version}", stable_dir, examples)
    normalized = (saved_model_info(f"{root}/{version}")[1],
                  saved_model_info(stable_dir)[1] if stable_dir else None)
    approval = decision_file.approval_of(decision)
    move_stable = approval is None or approval.choice == decision_file.STABLE
    client = ServingClient(serving.grpc_address, serving.rest_url)
    try:
        send_config(client, serving.models_config_path(base))  # Serving knows the labels
        try:
            verdict = shadow(client, model_name, pairs, normalized, options)
        except ServingUnreachable:
            raise  # transient: a retry checks again
        except ServingError as exc:  # the canary (or stable) answered with an error
            verdict = {"passed": False, "reason": f"Serving error: {exc}",
                       "requests": len(pairs)}
    finally:
        client.close()
    verdict = {"version": version, "stable_before": stable, **verdict,
               "checked_at": decision_file.now()}
    log(f"canary {model_name} version {version} vs stable {stable}: {verdict}")
    why = f"canary check: {verdict['reason']}" + (f"; {approval.says()}" if approval else "")
    by = approval.by if approval else None
    with model_lock(root):
        if verdict["passed"] and move_stable:
            moved = confirmed_move(partial(move_locked, label=STABLE, action="promote"),
                                   base, model_name, version, serving, reason=why, by=by)
            verdict["serving"] = moved["serving"]
        if not verdict["passed"] or move_stable:
            remove_label_locked(base, model_name, CANARY, options=serving,
                                action="canary_passed" if verdict["passed"] else
                                "canary_failed", reason=why, by=by)
            with ServingClient(serving.grpc_address, serving.rest_url) as client:
                send_config(client, serving.models_config_path(base))
    verdict["stable"] = _labels(base, model_name, serving).get(STABLE)
    if decision_path:
        decision_file.add(decision_path, "canary", verdict)
    if not verdict["passed"]:
        raise CanaryFailed(_failure(model_name, verdict))
    return verdict


def _failure(model_name: str, verdict: dict) -> str:
    return (f"{model_name} version {verdict['version']}: {verdict['reason']}; stable stays at "
            f"{verdict['stable']}, the canary label was removed")

