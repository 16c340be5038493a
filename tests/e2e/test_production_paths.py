"""The services the production-path tests need: a missing one skips them, or fails them when
$CI is set (CI promises PostgreSQL and Redis).

The production paths themselves (PostgreSQL metadata DB, a CeleryExecutor cluster routing
training to the `gpu` queue, a real scheduler running a backfill) are proven together in
`test_backfill.py`: one cluster, one set of TensorFlow start-ups.
"""

from __future__ import annotations

import pytest

from conftest import free_port
from support import production
from support.production import require


def test_missing_services_skip_or_under_ci_fail(monkeypatch):
    """The probe names what is missing; with $CI set it fails instead of skipping."""
    closed = free_port()  # nothing listens there any more
    monkeypatch.setitem(production.SERVICES, "Redis", ("127.0.0.1", closed))
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match=f"Redis at 127.0.0.1:{closed}$"):
        require("PostgreSQL", "Redis")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="not reachable: Redis"):
        require("Redis")
