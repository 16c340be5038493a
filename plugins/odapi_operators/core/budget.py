"""The failure budget: the share of images a stage may lose before the run must stop.

Below it, losses are listed and the run goes on (a few dead URLs must not block a retrain);
above it, something systemic is wrong (host down, bad credentials, wrong index) and training on
what is left would silently skew the data.
"""

from __future__ import annotations

from odapi_operators.core.failures import Failure
from odapi_operators.core.rejections import StageError

DEFAULT_MAX_FAILED_SHARE = 0.05


def check_budget(stage: str, failed: int, total: int, max_share: float, report: str,
                 failure: Failure = Failure.DATA) -> None:
    """Raise StageError naming the report when more than `max_share` of `total` failed."""
    if total and failed / total > max_share:
        raise StageError(f"{stage}: {failed} of {total} images failed ({failed / total:.1%}, "
                         f"budget {max_share:.1%}); see {report}", failure)
