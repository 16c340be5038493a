"""Gate stage: decide whether a candidate may be promoted, and always write why.

`decision.json` lists every check with its value, bound and verdict. No thresholds at all
means "never promote" (a decision is still written): promotion must be asked for explicitly.
"""

from __future__ import annotations

import json
from pathlib import Path

from odapi_operators.core import storage


def decide(metrics: dict[str, float], min_ap50: float | None) -> dict:
    """The promotion decision for `metrics` under the configured bounds."""
    checks = []
    if min_ap50 is not None:
        value = metrics.get("AP50")
        checks.append({"metric": "AP50", "op": ">=", "bound": min_ap50, "value": value,
                       "passed": value is not None and value >= min_ap50})
    if not checks:
        return {"promoted": False, "reason": "no thresholds configured: never promote",
                "checks": []}
    failed = [c for c in checks if not c["passed"]]
    reason = ("all checks passed" if not failed else
              "; ".join(f"{c['metric']} {c['value']} not {c['op']} {c['bound']}" for c in failed))
    return {"promoted": not failed, "reason": reason, "checks": checks}


def gate(metrics_path: str | Path, out_dir: str | Path, min_ap50: float | None) -> dict:
    """Read `metrics.json`, decide, write `decision.json`; return the decision with its path."""
    metrics = json.loads(storage.read_text(metrics_path))
    decision = {**decide(metrics, min_ap50), "metrics": str(metrics_path)}
    path = Path(out_dir) / "decision.json"
    storage.write_text(path, json.dumps(decision, indent=2))
    return {**decision, "decision": str(path)}
