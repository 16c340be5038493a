"""Run a stage as `python -m odapi_operators <stage> ...` in a child process.

TensorFlow stages run this way so the calling worker never holds TensorFlow or GPU memory
after the task. The child's output streams line by line to `log` as it happens; its last
stdout line is the stage's JSON summary.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import deque
from typing import Callable


class ChildStageError(RuntimeError):
    pass


def run_stage(args: list[str], log: Callable[[str], None],
              env: dict[str, str] | None = None) -> dict:
    """Run `odapi <args>` in a child; stream its output to `log`; return its JSON summary."""
    command = [sys.executable, "-u", "-m", "odapi_operators", *args]
    child_env = {**os.environ, "PYTHONUNBUFFERED": "1", "TF_USE_LEGACY_KERAS": "1",
                 **(env or {})}
    log(f"running: {' '.join(command)}")
    tail: deque[str] = deque(maxlen=20)
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=child_env, bufsize=1) as child:
        assert child.stdout is not None
        for line in child.stdout:
            line = line.rstrip("\n")
            tail.append(line)
            log(line)
        code = child.wait()
    if code != 0:
        raise ChildStageError(f"odapi {args[0]} failed with exit code {code}:\n" + "\n".join(tail))
    for line in reversed(tail):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    raise ChildStageError(f"odapi {args[0]} printed no JSON summary")
