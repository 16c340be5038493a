"""Export time: `odapi export` (SavedModel, warmup requests, and the check that the SavedModel
answers like the checkpoint) against a bare TF-Vision export of the same checkpoint.

The baseline is what a TF-Vision user runs: `export_saved_model_lib.export_inference_graph`
with the model's own params (its experiment overridden by the model dir's params.yaml), the
same input type and input size, and the same `checkpoint/` and `saved_model/` subfolders, in
a fresh Python process; no warmup requests, no check. Both run in fresh child processes,
alternating, timed from process start to exit. Prints the median seconds of each, the ratio
odapi / bare (goal: <= 1.0), what the check compared, and the load average before and after.

    nice -n 10 .venv/bin/python bench/export.py [--model-dir DIR --data RECORDS] [--rounds 3]
                                     [--input-type image_tensor]

Without --model-dir it first trains the sample model a few steps on sample records, keeping
every detection (no score threshold) so that the check compares real boxes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import yaml
from _common import BARE_PRELUDE, SAMPLE_MODEL, load, timed, use_this_tree

use_this_tree()

from odapi_operators.core.model.tfvision import newest_checkpoint  # noqa: E402

# The baseline child: argv = experiment, params.yaml, checkpoint, input type, export dir.
BARE_EXPORT = BARE_PRELUDE + """
from official.vision.serving import export_saved_model_lib

experiment, params_yaml, checkpoint, input_type, export_dir = sys.argv[1:]
params = bare_params(experiment, params_yaml)
export_saved_model_lib.export_inference_graph(
    input_type=input_type, batch_size=None,
    input_image_size=list(params.task.model.input_size[:2]), params=params,
    checkpoint_path=checkpoint, export_dir=export_dir,
    export_checkpoint_subdir="checkpoint", export_saved_model_subdir="saved_model")
"""


def sample_checkpoint(root: Path) -> tuple[str, str]:
    """A few training steps of the sample model on sample records: (model dir, records)."""
    from odapi_operators.core.data.ingest import ingest
    from odapi_operators.core.data.prepare import prepare
    from odapi_operators.core.data.sample_data import generate
    from odapi_operators.core.stages.child import run_json

    generate(root / "export", count=24, seed=0, max_side=128)
    ingest([str(root / "export")], root / "ingest")
    data = prepare(root / "ingest" / "manifest.jsonl", root / "prepared",
                   ratios={"train": 0.7, "val": 0.3})["data"]
    config = yaml.safe_load(SAMPLE_MODEL.read_text())
    config["params"]["task"]["model"]["detection_generator"]["pre_nms_score_threshold"] = 0.0
    (root / "model.yaml").write_text(yaml.safe_dump(config))
    run_json(["train", "--model-config", str(root / "model.yaml"), "--data", data, "--out",
              str(root / "model"), "--steps", "2", "--batch-size", "2"], lambda line: None)
    return str(root / "model"), data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir")
    parser.add_argument("--data")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--input-type", default="image_tensor",
                        choices=["image_tensor", "image_bytes", "tf_example"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="odapi-bench-export-") as tmp:
        root = Path(tmp)
        model_dir, data = ((args.model_dir, args.data) if args.model_dir
                           else sample_checkpoint(root))
        experiment = json.loads((Path(model_dir) / "odapi_train.json").read_text())["experiment"]
        odapi = [sys.executable, "-m", "odapi_operators", "export", "--model-dir", model_dir,
                 "--data", data, "--input-type", args.input_type, "--model-name", "shapes",
                 "--out"]
        bare = [sys.executable, "-c", BARE_EXPORT, experiment, str(Path(model_dir) / "params.yaml"),
                newest_checkpoint(model_dir), args.input_type]
        print(f"load average before: {load()}", flush=True)
        times: dict[str, list[float]] = {"odapi export": [], "bare TF-Vision": []}
        for round_ in range(args.rounds):
            times["odapi export"].append(timed([*odapi, str(root / f"odapi{round_}")])[0])
            times["bare TF-Vision"].append(timed([*bare, str(root / f"bare{round_}")])[0])
            print(f"round {round_ + 1}: odapi {times['odapi export'][-1]:.1f} s, bare "
                  f"{times['bare TF-Vision'][-1]:.1f} s (load {load()})", flush=True)
        check = json.loads((root / "odapi0" / "summary.json").read_text())["check"]
        medians = {name: statistics.median(values) for name, values in times.items()}
        for name, value in medians.items():
            runs = ", ".join(f"{v:.1f}" for v in times[name])
            print(f"{name:>15}: {value:6.1f} s median  (runs: {runs})")
        print(f"check: {check['warmup_requests']} warmup requests, {check['detections']} "
              f"detections compared, max difference {check['max_difference']:.1e}")
        print(f"input type {args.input_type}; load average after: {load()}")
        print(f"ratio odapi export / bare export_inference_graph: "
              f"{medians['odapi export'] / medians['bare TF-Vision']:.2f}")


if __name__ == "__main__":
    main()
