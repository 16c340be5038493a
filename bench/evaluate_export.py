"""A candidate's evaluation and export: one TensorFlow process (export ahead) against two.

- ahead (the default): `odapi evaluate` scores the val split and exports the candidate in the
  same process (`evaluate.export_ahead`), then `odapi export --exported-ahead` copies that
  checked export and adds the run's metrics, without TensorFlow;
- apart (before): `odapi evaluate --no-export-ahead`, then `odapi export`, which loads
  TensorFlow, builds, restores and traces the model again.

Both in a pipeline run folder (serving model name `shapes`, the export section's defaults:
`image_tensor`, 8 warmup requests and the check), each command in a fresh child process timed
from launch to exit, the two ways alternating. Prints each way's evaluate + export seconds,
the medians of their sums, the ratio ahead / apart, and checks both give the same AP50 and a
checked export.

    .venv/bin/python bench/evaluate_export.py [--model-dir DIR --data DIR] [--rounds 3] [--work DIR]

Without --model-dir it first trains the sample model 300 steps on the demo's records.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from _common import SAMPLE_MODEL, load, model_inputs, timed, use_this_tree

use_this_tree()

ODAPI = [sys.executable, "-m", "odapi_operators"]


def one_way(model: Path, data: Path, pipeline: Path, run_id: str, ahead: bool
            ) -> tuple[float, float, dict, dict]:
    """(evaluate s, export s, metrics.json, export summary) of one run folder."""
    run = ["--pipeline", str(pipeline), "--run-id", run_id]
    folder = pipeline.parent / "var" / "runs" / run_id
    metrics = folder / "evaluate" / "candidate" / "metrics.json"
    evaluated, _ = timed([*ODAPI, "evaluate", "--model", str(model), "--data", str(data), *run,
                          *([] if ahead else ["--no-export-ahead"])])
    exported, _ = timed([*ODAPI, "export", "--model-dir", str(model), "--data", str(data), *run,
                         "--extras", str(metrics),
                         *(["--exported-ahead", str(folder / "export_ahead")] if ahead else [])])
    summary = json.loads((folder / "export" / "summary.json").read_text())
    if ahead != ("ahead" in summary):
        sys.exit(f"{run_id}: the export {'did not use' if ahead else 'used'} an export ahead")
    return evaluated, exported, json.loads(metrics.read_text()), summary


def main() -> None:
    args, work, data, model = model_inputs(__doc__, "odapi-bench-evex-")
    pipeline = work / "pipeline.yaml"
    pipeline.write_text(json.dumps({
        "home": str(work), "exports": {"path": "exports"},
        "train": {"model_config": str(SAMPLE_MODEL), "steps": 1},
        "serving": {"base": "serving", "model_name": "shapes"}}))
    print(f"load average before: {load()}", flush=True)
    sums: dict[str, list[float]] = {"ahead": [], "apart": []}
    seen: dict[str, tuple[float, dict]] = {}
    for round_ in range(args.rounds):
        line = []
        for way in sums:
            evaluated, exported, metrics, summary = one_way(
                model, data, pipeline, f"{way}-{round_}", way == "ahead")
            sums[way].append(evaluated + exported)
            seen[way] = (metrics["AP50"], summary["check"])
            line.append(f"{way} {evaluated:.1f} + {exported:.1f} s")
        print(f"round {round_ + 1}: {', '.join(line)} (load {load()})", flush=True)
    medians = {way: statistics.median(values) for way, values in sums.items()}
    for way, value in medians.items():
        ap50, check = seen[way]
        print(f"{way:>6}: evaluate + export {value:6.1f} s median (runs: "
              f"{', '.join(f'{v:.1f}' for v in sums[way])}); AP50 {ap50:.3f}; check: "
              f"{check['warmup_requests']} warmup requests, max difference "
              f"{check['max_difference']:.1e}")
    print(f"load average after: {load()}")
    if seen["ahead"][0] != seen["apart"][0]:
        sys.exit(f"AP50 differs: ahead {seen['ahead'][0]}, apart {seen['apart'][0]}")
    print(f"ratio ahead / apart: {medians['ahead'] / medians['apart']:.2f} "
          f"({medians['apart'] - medians['ahead']:.1f} s less per candidate)")


if __name__ == "__main__":
    main()
