"""The failure budget: the share of images a stage may lose before the run must stop.

Below it, losses are listed and the run goes on (a few dead URLs must not block a retrain);
above it, something systemic is wrong (host down, bad credentials, wrong index, a broken
export) and training on what is left would silently skew the data.
"""

from __future__ import annotations

from odapi_operators.core.failures import Failure
from odapi_operators.core.rejections import StageError

DEFAULT_MAX_FAILED_SHARE = 0.05


def check_budget(stage: str, failed: int, total: int, max_share: float, report: str,
                 failure: Failure = Failure.DATA, *, lost: str = "failed",
                 setting: str = "images.max_failed_share") -> None:
    """Raise StageError when more than `max_share` of `total` were `lost`; the message names
    the count, the share, the threshold, its config key `setting` and its flag, and the report.
    """
    if total and failed / total > max_share:
        flag = "--" + setting.rsplit(".", 1)[-1].replace("_", "-")
        raise StageError(f"{stage}: {failed} of {total} images {lost} ({failed / total:.1%}), "
                         f"more than the budget {setting} = {max_share:g} ({max_share:.1%}; "
                         f"{flag} on the command line); see {report}", failure)
