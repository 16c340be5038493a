"""Why a stage stopped, as an exit status: whether retrying it can help.

A stage that fails because the network blinked should be retried; one that fails because the
config is wrong, the data is bad or the evaluation refused to give a number would fail the
same way forever, and retrying only delays the alert. Errors say which they are with a
`failure` attribute; anything else counts as transient. A child process reports the kind as
its exit status, so the operator that started it can tell Airflow whether to retry.
"""

from __future__ import annotations

from enum import Enum


class Failure(str, Enum):
    TRANSIENT = "transient"  # network, storage, a killed process: a retry may succeed
    CONFIG = "config"  # the pipeline config, a model config or the inputs are invalid
    DATA = "data"  # the data cannot give a usable result (nothing parsed, budget exceeded)
    REFUSED = "refused"  # evaluation or promotion refused to give an honest answer

    @property
    def retryable(self) -> bool:
        return self is Failure.TRANSIENT


EXIT_CODES = {Failure.TRANSIENT: 1, Failure.CONFIG: 3, Failure.DATA: 4, Failure.REFUSED: 5}
EXIT_SKIPPED = 6  # the stage decided there is nothing to do (not a failure)
_BY_CODE = {code: failure for failure, code in EXIT_CODES.items()}


class StageSkipped(Exception):
    """Nothing to do for this stage (a dry run's push, no new export): skip, don't fail."""


def failure_of(exc: BaseException) -> Failure:
    """The failure kind an exception declares (`failure` attribute), else transient.

    Pydantic validation errors of stage inputs or options are config errors.
    """
    declared = getattr(exc, "failure", None)
    if isinstance(declared, Failure):
        return declared
    if type(exc).__name__ == "ValidationError" and type(exc).__module__.startswith("pydantic"):
        return Failure.CONFIG
    return Failure.TRANSIENT


def failure_from_exit(code: int) -> Failure:
    return _BY_CODE.get(code, Failure.TRANSIENT)
