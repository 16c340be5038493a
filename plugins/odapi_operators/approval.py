"""The approval task: a person decides whether a candidate the gate passed goes to `stable`,
serves as `canary` only, or is rejected (`promote.approval`).

Airflow's Human-in-the-loop branch operator does the waiting: the task parks in
`awaiting_input` (no worker slot, no triggerer) until someone answers in the UI's Required
Actions or through the REST API (`PATCH .../taskInstances/{task_id}/-1/hitlDetails`), or until
`promote.approval_timeout_hours` pass and the default, Reject, applies. Its body is the
gate's verdict, every check and where the report is. The answer (who, the comment, or the
timeout) goes into decision.json (core/evaluation/decision.py), where the push and the
canary check read it and the registry record copies it. A forced run (`force_promote`) does
not wait: the gate recorded that approval already.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Sequence

from airflow.providers.standard.operators.hitl import HITLBranchOperator
from airflow.sdk import BaseOperator, Param
from airflow.sdk.definitions.param import ParamsDict

from odapi_operators.core.evaluation import decision as decision_file

CHOICES = {"Promote to stable": decision_file.STABLE,
           "Serve as canary only": decision_file.CANARY,
           "Reject": decision_file.REJECT}
REJECT = "Reject"


class ApprovePromotionOperator(HITLBranchOperator):
    """Ask a person, then branch: stable and canary to `push_task_id`, Reject to
    `reject_task_id`; the answer is recorded in the run's decision.json.

    :param decision: the gate's decision.json (templated).
    :param report: the run's report.html, shown in the request (templated).
    :param push_task_id: the task that pushes (it reads the label from the decision).
    :param reject_task_id: the task that runs when the candidate is rejected.
    :param timeout_hours: no answer within this: Reject.
    """

    template_fields: Sequence[str] = (*HITLBranchOperator.template_fields, "decision", "report")

    def __init__(self, *, decision: Any, report: Any, push_task_id: str, reject_task_id: str,
                 timeout_hours: float, **kwargs: Any) -> None:
        params = ParamsDict(kwargs.pop("params", None) or {})  # the DAG's, then the form's
        params["comment"] = Param(None, type=["null", "string"], source="task",
                                  description="Why (recorded with your choice)")
        super().__init__(
            subject="Promote the candidate of run {{ run_id }}?",
            body="(filled in from the gate's decision when the task runs)",
            options=list(CHOICES), defaults=[REJECT], multiple=False,
            options_mapping={option: reject_task_id if option == REJECT else push_task_id
                             for option in CHOICES},
            params=params,
            response_timeout=timedelta(hours=timeout_hours), **kwargs)
        self.decision, self.report = decision, report

    def execute(self, context: Any) -> Any:
        decision = decision_file.read(self.decision)
        given = decision_file.approval_of(decision)
        if given is not None and given.via == "force_promote":  # approved with the run itself
            self.log.info("not waiting: %s", given.says())
            option = next(k for k, v in CHOICES.items() if v == given.choice)
            return self.do_branch(context, self.options_mapping[option])
        self.body = decision_file.summary(decision, self.report, str(self.decision)) + (
            f"\n\nNo answer within {self.response_timeout}: **Reject**.")
        return super().execute(context)

    def execute_complete(self, context: Any, event: dict[str, Any]) -> Any:
        if "error" not in event:
            [option] = event["chosen_options"]
            user = event.get("responded_by_user") or {}
            approval = decision_file.Approval(
                choice=CHOICES[option], by=user.get("name") or user.get("id"),
                comment=(event.get("params_input") or {}).get("comment"),
                via="timeout" if event.get("timedout") else "approver",
                at=event["responded_at"].isoformat() if event.get("responded_at") else None)
            decision_file.add(self.decision, "approval", approval.model_dump())
            context["ti"].xcom_push(key="approval", value=approval.says())
            self.log.info("%s", approval.says())
        return super().execute_complete(context, event)


def wire_approval(promoted: BaseOperator, push: BaseOperator, *, decision: Any, report: Any,
                  timeout_hours: float, notify: dict | None = None) -> ApprovePromotionOperator:
    """Inside the promote group: `promoted` >> the approval task >> `push`, or a
    `rejected_by_approver` task (notifying `not_promoted` with the approver's words)."""
    from odapi_operators.notifiers import build_notifiers
    from odapi_operators.operators import NotifyOperator

    rejected = NotifyOperator(task_id="rejected_by_approver", reason=None, report=report)
    approve = ApprovePromotionOperator(task_id="approve", decision=decision, report=report,
                                       push_task_id=push.task_id,
                                       reject_task_id=rejected.task_id,
                                       timeout_hours=timeout_hours)
    said = f"{{{{ ti.xcom_pull(task_ids='{approve.task_id}', key='approval') }}}}"
    rejected.reason = said
    rejected.on_success_callback = build_notifiers(notify, "not_promoted", reason=said)
    promoted >> approve >> [push, rejected]
    return approve
