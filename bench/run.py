"""Run every benchmark in bench/ (each prints ratios against a baseline measured in the same run).

Modules named `_*.py` are helpers, not benchmarks; those in ON_DEMAND take too long for a
routine run and are only listed, with how to run them.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ON_DEMAND = {"active_learning.py": "three trainings: ~15-20 min on 2 quiet cores",
             "export.py": "a short training and six exports (3 rounds): ~10 min on 2 quiet cores",
             "freshness.py": "an embedded Airflow, two trainings and exports: ~15-25 min",
             "time_to_quality.py": "one training per recipe and seed (6 by default): ~30 min "
                                   "on 2 quiet cores",
             "continuous.py": "seven trainings, nine evaluations: ~29 min on 2 quiet cores",
             "train.py": "six trainings of 200-300 steps: ~10-15 min on 2 quiet cores",
             "evaluate.py": "a 300-step training and nine evaluations: ~6 min on 2 quiet cores",
             "evaluate_export.py": "a 300-step training, six evaluations and exports: "
                                   "~7 min on 2 quiet cores",
             "ingest_openimages.py": "15M boxes (~2.5 GB generated once, cached under /tmp): "
                                     "see its docstring; --boxes 2000000 for a shorter run"}

for script in sorted(Path(__file__).parent.glob("*.py")):
    if script.name in ON_DEMAND:
        print(f"== {script.name}: skipped ({ON_DEMAND[script.name]}); run it alone: "
              f"{sys.executable} {script}", flush=True)
    elif script.name != "run.py" and not script.name.startswith("_"):
        print(f"== {script.name}", flush=True)
        subprocess.run([sys.executable, str(script)], check=True)
