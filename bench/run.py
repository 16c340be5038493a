"""Run every benchmark in bench/ (each prints ratios against a baseline measured in the same run).

Modules named `_*.py` are helpers, not benchmarks.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

for script in sorted(Path(__file__).parent.glob("*.py")):
    if script.name != "run.py" and not script.name.startswith("_"):
        print(f"== {script.name}", flush=True)
        subprocess.run([sys.executable, str(script)], check=True)
