"""Export time: the SavedModel export with its serving signatures only, against the same export
tracing every Keras layer for a Keras reload (what `tf.saved_model.save` does by default).

Both run `odapi export` on the same checkpoint in fresh child processes, alternating, and
both must pass the export check (warmup requests replayed against the checkpoint). Prints
the median seconds of each and the ratio.

    .venv/bin/python bench/export.py [--model-dir DIR --data RECORDS] [--rounds 2]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_MODEL = ROOT / "include/configs/models/retinanet_mobile_sample.yaml"
# The baseline: the exporter with its Keras-trace scope replaced by a no-op.
TRACING = ("import contextlib, sys; "
           "from odapi_operators.core.model import exporter; "
           "exporter._serving_signatures_only = contextlib.nullcontext; "
           "from odapi_operators.cli import main; sys.exit(main(sys.argv[1:]))")


def checkpoint(root: Path) -> tuple[str, str]:
    """A few training steps of the sample model on sample records: (model dir, records)."""
    from odapi_operators.core.data.ingest import ingest
    from odapi_operators.core.data.prepare import prepare
    from odapi_operators.core.data.sample_data import generate
    from odapi_operators.core.stages.child import run_json

    generate(root / "export", count=24, seed=0, max_side=128)
    ingest([str(root / "export")], root / "ingest")
    data = prepare(root / "ingest" / "manifest.jsonl", root / "prepared",
                   ratios={"train": 0.7, "val": 0.3})["data"]
    run_json(["train", "--model-config", str(SAMPLE_MODEL), "--data", data, "--out",
              str(root / "model"), "--steps", "2", "--batch-size", "2"], lambda line: None)
    return str(root / "model"), data


def timed(command: list[str]) -> float:
    started = time.monotonic()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir")
    parser.add_argument("--data")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="odapi-bench-export-") as tmp:
        root = Path(tmp)
        model_dir, data = ((args.model_dir, args.data) if args.model_dir
                           else checkpoint(root))
        export = ["export", "--model-dir", model_dir, "--data", data, "--input-type",
                  "image_bytes", "--model-name", "shapes", "--out"]
        times: dict[str, list[float]] = {"signatures only": [], "tracing layers": []}
        for round_ in range(args.rounds):
            times["signatures only"].append(timed(
                [sys.executable, "-m", "odapi_operators", *export, str(root / f"a{round_}")]))
            times["tracing layers"].append(timed(
                [sys.executable, "-c", TRACING, *export, str(root / f"b{round_}")]))
        medians = {name: statistics.median(values) for name, values in times.items()}
        for name, value in medians.items():
            runs = ", ".join(f"{v:.1f}" for v in times[name])
            print(f"{name:>16}: {value:6.1f} s  (runs: {runs})")
        print(f"ratio signatures only / tracing layers: "
              f"{medians['signatures only'] / medians['tracing layers']:.2f}")


if __name__ == "__main__":
    main()
