"""Named points where a test can freeze a process, so it can be killed there with SIGKILL.

Crash-safety claims ("a push killed at any point leaves nothing Serving would load") are only
worth something if a test kills a real process at the dangerous moments. With
`ODAPI_PAUSE_AT=<point>` and `ODAPI_PAUSE_SIGNAL=<file>` in the environment, reaching
`<point>` creates `<file>` and sleeps until killed. Unset (always, outside tests), a point
costs one dictionary lookup.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

ENV = "ODAPI_PAUSE_AT"
SIGNAL_ENV = "ODAPI_PAUSE_SIGNAL"


def reached(point: str) -> None:
    """Pause forever here if a test asked for `point`."""
    if os.environ.get(ENV) != point:
        return
    Path(os.environ[SIGNAL_ENV]).write_text(str(os.getpid()))
    while True:
        time.sleep(60)
