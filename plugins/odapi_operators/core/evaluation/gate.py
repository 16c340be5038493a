"""Gate stage: decide whether a candidate may replace the model that is serving, and say why.

The policy (`GatePolicy`, the `gate:` section of the pipeline YAML) holds absolute bounds per
metric, change thresholds against the production baseline, a per-class regression tolerance,
a minimum number of eval images, and slice checks: a candidate-minus-production delta on the
`all`, `new` or `old` val images (slices.py) with a paired bootstrap interval (bootstrap.py),
whose lower bound a check can require to clear the threshold. The baseline is the version
Serving actually answers with (`stable`, else the newest; see
`serving_dir.production_version`), evaluated on the same split in the same run. Rules, from
what went wrong with TFX's Evaluator:

- `decision.json` is always written: every check with its value, bound and verdict.
- No thresholds configured: never promote. Promotion must be asked for.
- No production model yet: change checks pass by rule ("first model"); bounds still apply.
- A baseline version without baseline metrics fails the change checks: never guess.
- Forcing needs a reason, and who/why are recorded. Backfills are gated like any run.
- A slice without images (the first dataset version has nothing `old`) or metrics without
  slices (evaluated without a dataset diff) skip its checks, with a note; never a crash.
"""

from __future__ import annotations

import json
import math
import os
import sys
import zipfile
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from odapi_operators.core import storage
from odapi_operators.core.evaluation import decision as decision_file
from odapi_operators.core.evaluation.names import METRICS, SLICES
from odapi_operators.core.failures import Failure
from odapi_operators.core.layout import DECISION, MATCHES

if TYPE_CHECKING:  # NumPy stays out of parse time (the config imports GatePolicy)
    from odapi_operators.core.evaluation.bootstrap import Matches

# Float noise must not flip a verdict: 0.7 - 0.6 is 0.0999..., not below a min_delta of 0.1.
_EPS = 1e-9


class GateError(ValueError):
    """The gate was asked for something it must refuse (e.g. forcing without a reason)."""
    failure = Failure.REFUSED


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Bound(_Strict):
    """Absolute bound on one metric: `{min: 0.5}`, `{max: 1.0}` or both."""

    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _some_bound(self) -> Bound:
        if self.min is None and self.max is None:
            raise ValueError("give min, max or both")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min {self.min} is above max {self.max}")
        return self


class ChangeThreshold(_Strict):
    """How the candidate must compare with production on one metric.

    `min_delta` is the required improvement in the metric's good direction: 0 means "no worse
    than production", 0.01 "at least 0.01 better", -0.01 "at most 0.01 worse". With
    `relative: true` the improvement is a fraction of the production value (0.05 = 5 %).
    `higher_is_better` defaults to false for `*loss` metrics and true for everything else.
    """

    min_delta: float = 0.0
    relative: bool = False
    higher_is_better: bool | None = None


def higher_is_better(metric: str, threshold: ChangeThreshold | None = None) -> bool:
    if threshold is not None and threshold.higher_is_better is not None:
        return threshold.higher_is_better
    return not metric.endswith("loss")


SliceName = Literal["all", "new", "old"]


class SliceCheck(_Strict):
    """Candidate minus production on one slice's val images must be at least `min_delta`.

    With `use_interval: true` the lower bound of the paired bootstrap interval must clear it,
    not just the point delta: "better, and not by luck". A "no worse than" check (a negative
    `min_delta` on `old`) usually tests the point: on a few dozen images the lower bound of
    even an identical model sits well below -0.01.
    """

    slice: SliceName
    metric: Literal["AP", "AP50", "AP75"] = "AP50"
    min_delta: float = 0.0
    use_interval: bool = False


class BootstrapPolicy(_Strict):
    """The paired bootstrap over val images behind every slice check's interval."""

    resamples: int = Field(default=1000, ge=1000, le=100_000)
    confidence: float = Field(default=0.95, gt=0, lt=1)
    seed: int = 0


# Forgetting is what a gate on all images misses; guard the old images unless told otherwise.
DEFAULT_SLICE_CHECKS = (SliceCheck(slice="old", metric="AP50", min_delta=-0.01),)


class GatePolicy(_Strict):
    """The `gate:` section of the pipeline YAML."""

    min_ap50: float | None = Field(default=None, ge=0, le=1)  # shorthand for bounds.AP50.min
    bounds: dict[str, Bound] = {}
    vs_production: dict[str, ChangeThreshold] = {}
    per_class_max_drop: float | None = Field(default=None, ge=0)  # largest per-class AP drop
    min_eval_images: int | None = Field(default=None, ge=1)
    slices: list[SliceCheck] = Field(
        default=list(DEFAULT_SLICE_CHECKS), description="checks on the all/new/old val "
        "images: [{slice, metric, min_delta, use_interval}]; replaces the default `old` guard")
    bootstrap: BootstrapPolicy = Field(default=BootstrapPolicy(), description="resamples, "
                                       "confidence and seed of the slice intervals")

    @field_validator("bounds", "vs_production")
    @classmethod
    def _metric_names(cls, value: dict) -> dict:
        bad = [k for k in value if not k or k in ("per_class", "eval_images")]
        if bad:
            raise ValueError(f"not a scalar metric name: {bad} (use per_class_max_drop / "
                             "min_eval_images)")
        return value

    def effective_bounds(self) -> dict[str, Bound]:
        """`bounds` with `min_ap50` applied; `min_ap50` (what the DAG param sets) wins."""
        if self.min_ap50 is None:
            return dict(self.bounds)
        ap50 = self.bounds.get("AP50")
        return {**self.bounds, "AP50": Bound(min=self.min_ap50, max=ap50.max if ap50 else None)}

    def has_thresholds(self) -> bool:
        """Anything that can justify promotion (min_eval_images alone is a sanity check, and
        so is the default `old` guard: promotion must be asked for)."""
        return bool(self.effective_bounds() or self.vs_production
                    or self.per_class_max_drop is not None
                    or self.slices != list(DEFAULT_SLICE_CHECKS) and self.slices)


class Baseline(BaseModel):
    """The production model as evaluated in this run; `version=None`: nothing serves yet."""

    version: int | None = None
    metrics: dict[str, Any] | None = None
    source: str | None = None  # e.g. the baseline's metrics.json


class Force(BaseModel):
    """An audited override: promote whatever the checks say."""

    reason: str
    by: str | None = None

    @field_validator("reason")
    @classmethod
    def _has_reason(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("forcing a promotion needs a reason")
        return value.strip()


Verdict = Literal["pass", "fail", "skipped"]


def _number(value: Any) -> float | None:
    """A finite float, or None (missing, NaN, COCO's -1 for "no ground truth")."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _check(kind: str, metric: str, op: str, bound: Any, value: Any, verdict: Verdict,
           note: str | None = None, **extra: Any) -> dict:
    label = f"{metric} {op} {bound}" if kind == "bound" else f"{kind}:{metric}"
    return {"check": label, "kind": kind, "metric": metric, "op": op, "bound": bound,
            "value": value, **extra, "verdict": verdict, "passed": verdict != "fail",
            **({"note": note} if note else {})}


def _bound_checks(metrics: dict, bounds: dict[str, Bound]) -> list[dict]:
    checks = []
    for metric, bound in bounds.items():
        value = _number(metrics.get(metric))
        for op, limit in ((">=", bound.min), ("<=", bound.max)):
            if limit is None:
                continue
            ok = value is not None and (value >= limit - _EPS if op == ">=" else
                                        value <= limit + _EPS)
            checks.append(_check("bound", metric, op, limit, value, "pass" if ok else "fail",
                                 None if value is not None else "metric missing or not finite"))
    return checks


def _improvement(candidate: float, base: float, up: bool, relative: bool) -> float:
    gain = candidate - base if up else base - candidate
    if not relative:
        return gain
    if base == 0:
        return 0.0 if abs(gain) <= _EPS else math.copysign(math.inf, gain)
    return gain / abs(base)


def _change_checks(metrics: dict, baseline: Baseline, policy: GatePolicy) -> list[dict]:
    checks = []
    for metric, threshold in policy.vs_production.items():
        up = higher_is_better(metric, threshold)
        extra = {"relative": threshold.relative, "higher_is_better": up}
        value = _number(metrics.get(metric))
        if baseline.version is None:
            checks.append(_check("vs_production", metric, "improvement >=", threshold.min_delta,
                                 value, "skipped", "first model: no production baseline, "
                                 "passes by rule", **extra))
            continue
        base = _number((baseline.metrics or {}).get(metric))
        if value is None or base is None:
            checks.append(_check("vs_production", metric, "improvement >=", threshold.min_delta,
                                 value, "fail", f"{'candidate' if value is None else 'baseline'}"
                                 " value missing or not finite", baseline=base, **extra))
            continue
        gain = _improvement(value, base, up, threshold.relative)
        ok = gain >= threshold.min_delta - _EPS
        checks.append(_check("vs_production", metric, "improvement >=", threshold.min_delta,
                             value, "pass" if ok else "fail", baseline=base,
                             improvement=gain, **extra))
    return checks


def _per_class_checks(metrics: dict, baseline: Baseline, max_drop: float) -> list[dict]:
    if baseline.version is None:
        return [_check("per_class", "*", "drop <=", max_drop, None, "skipped",
                       "first model: no production baseline, passes by rule")]
    candidate = metrics.get("per_class")
    base = (baseline.metrics or {}).get("per_class")
    if not isinstance(candidate, dict) or not isinstance(base, dict):
        side = "candidate" if not isinstance(candidate, dict) else "baseline"
        return [_check("per_class", "*", "drop <=", max_drop, None, "fail",
                       f"{side} metrics have no per_class AP")]
    checks = []
    for name in sorted(base):
        before, after = _number(base[name]), _number(candidate.get(name))
        if before is None or before < 0:
            checks.append(_check("per_class", name, "drop <=", max_drop, after, "skipped",
                                 "no baseline AP for this class (no ground truth?)",
                                 baseline=before))
            continue
        if after is None or after < 0:
            checks.append(_check("per_class", name, "drop <=", max_drop, after, "fail",
                                 "candidate has no AP for a class production detects",
                                 baseline=before))
            continue
        drop = before - after
        checks.append(_check("per_class", name, "drop <=", max_drop, after,
                             "pass" if drop <= max_drop + _EPS else "fail", baseline=before,
                             drop=drop))
    return checks


def _eval_checks(metrics: dict, baseline: Baseline, minimum: int | None) -> list[dict]:
    checks = []
    images = metrics.get("eval_images")
    if minimum is not None:
        ok = isinstance(images, int) and images >= minimum
        checks.append(_check("eval_images", "eval_images", ">=", minimum, images,
                             "pass" if ok else "fail"))
    base_images = (baseline.metrics or {}).get("eval_images")
    if baseline.metrics is not None and images is not None and base_images is not None:
        same = images == base_images
        checks.append(_check("same_split", "eval_images", "==", base_images, images,
                             "pass" if same else "fail",
                             None if same else "baseline was not evaluated on the same split"))
    return checks


def _slice_metrics(metrics: dict | None, name: str) -> dict | None:
    """One slice's metrics; metrics without slices (no diff, older files) have `all` only."""
    if metrics is None:
        return None
    slices = metrics.get("slices")
    if isinstance(slices, dict):
        return slices.get(name)
    return {**metrics, "images": metrics.get("eval_images")} if name == "all" else None


def compare_slices(metrics: dict, baseline_metrics: dict | None,
                   bootstrap: BootstrapPolicy | None = None,
                   candidate_matches: Matches | None = None,
                   baseline_matches: Matches | None = None) -> dict[str, dict]:
    """Per slice of the candidate: images, and per bootstrap metric candidate, production,
    delta and interval (None without production or matches). What the slice checks and the
    report read."""
    bootstrap = bootstrap or BootstrapPolicy()
    names = [n for n in SLICES if _slice_metrics(metrics, n) is not None]
    result: dict[str, dict] = {}
    computed: dict[tuple[int, ...], dict] = {}
    for name in names:
        own = _slice_metrics(metrics, name) or {}
        base = _slice_metrics(baseline_metrics, name)
        images = own.get("images")
        entry: dict[str, Any] = {"images": images}
        ids = (candidate_matches.slices.get(name) if candidate_matches is not None
               and candidate_matches.slices else None)
        if ids is None and name == "all" and candidate_matches is not None:
            ids = candidate_matches.image_ids
        intervals: dict[str, Any] = {}
        note = None
        if base is not None and images and candidate_matches is not None \
                and baseline_matches is not None and ids is not None:
            key = tuple(int(i) for i in ids)  # `new` is `all` in a first version
            try:
                if key not in computed:
                    from odapi_operators.core.evaluation.bootstrap import paired_intervals

                    computed[key] = paired_intervals(
                        candidate_matches, baseline_matches, key, tuple(METRICS),
                        resamples=bootstrap.resamples, confidence=bootstrap.confidence,
                        seed=bootstrap.seed)
                intervals = computed[key]
            except ValueError as exc:
                note = f"no interval: {exc}"
        elif base is not None and images:
            note = "no interval: per-image matches missing for " + (
                "the candidate" if candidate_matches is None else "production")
        for metric in METRICS:
            value, before = _number(own.get(metric)), _number((base or {}).get(metric))
            interval = intervals.get(metric)
            entry[metric] = {"candidate": value, "production": before,
                             "delta": (value - before if value is not None
                                       and before is not None else None),
                             "interval": ([interval.low, interval.high]
                                          if interval is not None and interval.low is not None
                                          else None)}
        if note:
            entry["note"] = note
        result[name] = entry
    return result


def _slice_verdict(spec: SliceCheck, seen: dict | None, numbers: dict,
                   first_model: bool) -> tuple[Verdict, Any, str | None]:
    """(verdict, value tested, note) of one slice check."""
    if first_model:
        return "skipped", None, "first model: no production baseline, passes by rule"
    if seen is None:
        return "skipped", None, (f"no `{spec.slice}` slice in the candidate's metrics "
                                 "(evaluated without a dataset diff)")
    if not seen.get("images"):
        return "skipped", None, (f"no val image in slice `{spec.slice}` (e.g. the first "
                                 "dataset version has nothing old): nothing to compare, passes")
    if numbers.get("delta") is None:
        side = "candidate" if numbers.get("candidate") is None else "production"
        return "fail", None, f"{side} has no {spec.metric} on slice `{spec.slice}`"
    if spec.use_interval and numbers.get("interval") is None:
        return "fail", None, seen.get("note") or "no interval: cannot bound the delta"
    value = numbers["interval"][0] if spec.use_interval else numbers["delta"]
    return ("pass" if value >= spec.min_delta - _EPS else "fail"), value, None


def _slice_checks(comparison: dict[str, dict], baseline: Baseline,
                  policy: GatePolicy) -> list[dict]:
    checks = []
    for spec in policy.slices:
        seen = comparison.get(spec.slice)
        numbers = (seen or {}).get(spec.metric) or {}
        verdict, value, note = _slice_verdict(spec, seen, numbers, baseline.version is None)
        checks.append({
            "check": f"slice:{spec.slice}:{spec.metric}", "kind": "slice",
            "slice": spec.slice, "metric": spec.metric,
            "op": "interval low >=" if spec.use_interval else "delta >=",
            "bound": spec.min_delta, "value": value, "candidate": numbers.get("candidate"),
            "production": numbers.get("production"), "baseline": numbers.get("production"),
            "delta": numbers.get("delta"), "interval": numbers.get("interval"),
            "confidence": policy.bootstrap.confidence, "use_interval": spec.use_interval,
            "images": (seen or {}).get("images"), "verdict": verdict,
            "passed": verdict != "fail", **({"note": note} if note else {})})
    return checks


def decide(metrics: dict[str, Any], policy: GatePolicy, baseline: Baseline | None = None,
           force: Force | None = None, candidate_matches: Matches | None = None,
           baseline_matches: Matches | None = None) -> dict:
    """The promotion decision: pure, every check listed, `rule` saying what decided it.

    The per-image matches (matches.npz of both evaluations) give the slice deltas their
    bootstrap intervals; without them the slice checks test point deltas only.
    """
    baseline = baseline or Baseline()
    comparison = compare_slices(metrics, baseline.metrics if baseline.version is not None
                                else None, policy.bootstrap, candidate_matches,
                                baseline_matches)
    checks = [*_eval_checks(metrics, baseline, policy.min_eval_images),
              *_bound_checks(metrics, policy.effective_bounds()),
              *_change_checks(metrics, baseline, policy)]
    if policy.per_class_max_drop is not None:
        checks += _per_class_checks(metrics, baseline, policy.per_class_max_drop)
    checks += _slice_checks(comparison, baseline, policy)
    failed = [c for c in checks if c["verdict"] == "fail"]
    first_model = baseline.version is None
    if not policy.has_thresholds():
        promoted, rule, reason = False, "no_thresholds", "no thresholds configured: never promote"
    elif failed:
        promoted, rule = False, "checks"
        reason = "; ".join(_failure(c) for c in failed)
    elif first_model:
        promoted, rule = True, "first_model"
        reason = "first model: no production version to compare with; promoted by rule"
    else:
        promoted, rule, reason = True, "checks", "all checks passed"
    if force is not None:
        reason = f"forced ({force.reason}); checks said: {reason}"
        promoted, rule = True, "forced"
    return {"promoted": promoted, "rule": rule, "reason": reason, "first_model": first_model,
            "forced": force is not None, "force": force.model_dump() if force else None,
            "checks": checks, "slices": comparison,
            "baseline": {"version": baseline.version, "metrics": baseline.source},
            "policy": policy.model_dump(exclude_defaults=True)}


def _failure(check: dict) -> str:
    if check["kind"] == "bound":
        text = f"{check['metric']} {check['value']} not {check['op']} {check['bound']}"
    elif check["kind"] == "slice":
        text = (f"{check['metric']} on slice {check['slice']} ({check['images']} images): "
                f"{_rounded(check['candidate'])} vs production {_rounded(check['production'])}")
        if check["delta"] is not None:
            text += f", delta {_rounded(check['delta'])}"
        if check["interval"] is not None:
            low, high = check["interval"]
            text += f" [{_rounded(low)}, {_rounded(high)}]"
        text += f", needs {check['op']} {check['bound']}"
    else:
        text = f"{check['check']} {check['value']}"
        if "baseline" in check:
            text += f" vs production {check['baseline']}"
        text += f", needs {check['op']} {check['bound']}"
    return text + (f" ({check['note']})" if check.get("note") else "")


def _rounded(value: Any) -> str:
    return f"{value:+.3f}" if isinstance(value, float) and value < 0 else (
        f"{value:.3f}" if isinstance(value, float) else str(value))


def as_policy(policy: GatePolicy | dict | float | None) -> GatePolicy:
    """A GatePolicy from the config section, a dict, or the legacy bare `min_ap50`."""
    if isinstance(policy, GatePolicy):
        return policy
    if isinstance(policy, dict):
        return GatePolicy.model_validate(policy)
    return GatePolicy(min_ap50=policy)


def _matches_beside(metrics_path: str | Path) -> Matches | None:
    """The evaluation's matches.npz beside its metrics.json; None for older evaluations or an
    unreadable file (interval checks then fail closed, saying so)."""
    path = f"{os.fspath(metrics_path).rsplit('/', 1)[0]}/{MATCHES}" if "/" in os.fspath(
        metrics_path) else MATCHES
    if not storage.exists(path):
        return None
    from odapi_operators.core.evaluation.bootstrap import read_matches

    try:
        return read_matches(path)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        print(f"warning: {path}: unreadable per-image matches ({exc}); no intervals",
              file=sys.stderr)
        return None


def gate(metrics_path: str | Path, out_dir: str | Path,
         policy: GatePolicy | dict | float | None, *,
         baseline_version: int | None = None, baseline_metrics: str | Path | None = None,
         dataset_version: str | None = None, force_reason: str | None = None,
         forced_by: str | None = None, force: bool = False) -> dict:
    """Read the metrics, decide, write `<out_dir>/decision.json`; return it with its path.

    `force=True` forces promotion, recording `force_reason` and `forced_by`; without a reason
    it writes a refusal into decision.json and raises GateError, so the run fails loudly.
    """
    metrics = json.loads(storage.read_text(metrics_path))
    candidate_matches = _matches_beside(metrics_path)
    baseline_matches = _matches_beside(baseline_metrics) if baseline_metrics else None
    base = Baseline(version=baseline_version,
                    source=str(baseline_metrics) if baseline_metrics else None,
                    metrics=(json.loads(storage.read_text(baseline_metrics))
                             if baseline_metrics else None))
    refusal = None
    forced = None
    if force:
        if force_reason and force_reason.strip():
            forced = Force(reason=force_reason, by=forced_by)
        else:
            refusal = "forced promotion refused: no reason given"
    decision = decide(metrics, as_policy(policy), base, forced, candidate_matches,
                      baseline_matches)
    if refusal:
        decision.update(promoted=False, rule="force_refused", reason=refusal,
                        force={"reason": None, "by": forced_by})
    path = Path(out_dir) / DECISION
    decided_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    decision = {**decision, "metrics": str(metrics_path),
                "dataset_version": dataset_version or metrics.get("dataset_version"),
                "decided_at": decided_at}
    if forced is not None:  # recorded as an approval too, like an approver's answer
        decision["approval"] = decision_file.forced(forced.reason, forced.by,
                                                    decided_at).model_dump()
    storage.write_text(path, json.dumps(decision, indent=2))
    if refusal:
        raise GateError(f"{path}: {refusal} (pass a reason to force)")
    return {**decision, "decision": str(path)}
