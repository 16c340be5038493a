"""decision.json after the gate: who approved which label, and how the canary fared.

The gate writes the file (gate.py). What happens to a candidate the gate passed is added to
it, so one file (and the registry record built from it) tells the whole story:

- `approval`: the label a person chose (`stable`, `canary` only, or `reject`), who and why.
  Three ways in, one shape: an answer to the Airflow approval task (`via: approver`), that
  task's timeout (`via: timeout`, always `reject`), or `force_promote` (`via: force_promote`,
  written by the gate with the run's trigger user and reason).
- `canary`: the canary check's verdict, numbers and reason (core/serving/canary.py).

Each addition rewrites the file atomically and leaves the gate's keys alone. Plain JSON and
pydantic only: the Airflow approval task reads this while the DAG file parses fast.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from odapi_operators.core import storage

Choice = Literal["stable", "canary", "reject"]
STABLE, CANARY, REJECT = "stable", "canary", "reject"  # serving labels' names, and no label


class Approval(BaseModel):
    """One answer to "may this candidate serve, and under which label?"."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    choice: Choice
    by: str | None = None
    comment: str | None = None
    via: Literal["approver", "timeout", "force_promote"] = "approver"
    at: str | None = None

    def says(self) -> str:
        """One line for logs, notifications and the registry's label records."""
        who = {"timeout": "nobody answered in time",
               "force_promote": f"forced by {self.by or 'an unknown user'}"}.get(
            self.via, f"{self.by or 'an unknown user'} chose {self.choice}")
        return who + (f": {self.comment}" if self.comment else "")


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def read(path: str | os.PathLike) -> dict[str, Any]:
    return json.loads(storage.read_text(path))


def add(path: str | os.PathLike, key: str, value: Any) -> dict[str, Any]:
    """Set `key` of the decision at `path` (atomically); returns the whole decision."""
    decision = {**read(path), key: value}
    storage.write_text(path, json.dumps(decision, indent=2))
    return decision


def approval_of(decision: dict[str, Any]) -> Approval | None:
    given = decision.get("approval")
    return Approval.model_validate(given) if given else None


def forced(reason: str, by: str | None, at: str) -> Approval:
    """`force_promote` as an approval: to `stable`, by whoever triggered the run, and why."""
    return Approval(choice=STABLE, by=by, comment=reason, via="force_promote", at=at)


def label_to_move(decision: dict[str, Any], canary_first: bool) -> str | None:
    """The label a push points at the new version: `canary` when the approver chose canary
    only or canary checks come first, else `stable`; None when the approver rejected it."""
    approval = approval_of(decision)
    if approval is not None and approval.choice == REJECT:
        return None
    if canary_first or (approval is not None and approval.choice == CANARY):
        return CANARY
    return STABLE


def _number(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def summary(decision: dict[str, Any], report: str | None, decision_path: str | None) -> str:
    """What an approver reads before choosing (Markdown): the gate's verdict and reason, every
    check, and where the report and the decision are."""
    verdict = "passed" if decision.get("promoted") else "did not pass"
    lines = [f"**The gate {verdict}** (rule `{decision.get('rule')}`): {decision.get('reason')}",
             "", "| check | value | production | bound | verdict |", "|---|---|---|---|---|"]
    for check in decision.get("checks") or []:
        name = check.get("check") if check.get("kind") == "bound" else (
            f"{check.get('kind')} {check.get('metric')}"
            + (f" ({check['slice']})" if check.get("slice") else ""))
        lines.append(f"| {name} | {_number(check.get('value'))} | "
                     f"{_number(check.get('baseline', check.get('production', '-')))} | "
                     f"{check.get('op')} {_number(check.get('bound'))} | {check.get('verdict')} |")
    baseline = (decision.get("baseline") or {}).get("version")
    lines += ["", f"Production version: {baseline if baseline is not None else 'none yet'}; "
                  f"dataset version: `{decision.get('dataset_version') or '-'}`",
              f"Report: `{report or 'not written'}`", f"Decision: `{decision_path or '-'}`"]
    return "\n".join(lines)
