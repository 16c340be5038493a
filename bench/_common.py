"""What the TensorFlow benchmarks share: the demo's records, the start of every bare TF-Vision
baseline child, and timing a child process.

The demo's records: `odapi sample --count 200 --seed 0`, ingested, fetched, verified at max side
640, and written as the pipeline does by default: 80/20 split by image key (39 val images), one
shard per split. Made once per work folder and reused.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_MODEL = ROOT / "include/configs/models/retinanet_mobile_sample.yaml"

# The start of every bare TF-Vision baseline (a `python -c` child, no odapi code): TensorFlow
# set up as TF-Vision's driver does, and `bare_params`, an experiment overridden by the
# params.yaml odapi wrote into a model dir.
BARE_PRELUDE = """
import os, sys
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
import tensorflow as tf
import official.vision.registry_imports
from official.core import exp_factory
from official.modeling import hyperparams


def bare_params(experiment, params_yaml):
    return hyperparams.override_params_dict(exp_factory.get_exp_config(experiment),
                                            params_yaml, is_strict=True)
"""


def use_this_tree() -> None:
    """This tree's code, here and in every child (the virtualenv may point at another
    checkout)."""
    sys.path.insert(0, str(ROOT / "plugins"))
    os.environ["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(ROOT / "plugins"), os.environ.get("PYTHONPATH")]))


def demo_records(work: Path) -> Path:
    """`work`/records, made if missing."""
    records = work / "records"
    if (records / "summary.json").exists():
        return records
    from odapi_operators.core.data.ingest import ingest
    from odapi_operators.core.data.label_map import build_label_map
    from odapi_operators.core.data.prepare import fetch_and_verify
    from odapi_operators.core.data.sample_data import generate
    from odapi_operators.core.data.shard import write_shards

    generate(work / "export", count=200, seed=0)
    ingest([str(work / "export")], work / "ingest")
    _, verified = fetch_and_verify(work / "ingest" / "manifest.jsonl", work / "prepared",
                                   max_side=640)
    build_label_map(verified["manifest"], work / "label_map")
    write_shards(verified["manifest"], work / "label_map" / "label_map.pbtxt", records,
                 {"train": 0.8, "val": 0.2}, {"train": 1, "val": 1})
    return records


def model_inputs(doc: str, prefix: str) -> tuple[argparse.Namespace, Path, Path, Path]:
    """The command line of a benchmark over one trained model (`--model-dir`, `--data`,
    `--rounds`, `--work`): (its arguments, the work folder, the records, the model dir),
    the demo's records and the sample model made in the work folder when not given."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--model-dir", help="a trained model dir (default: train one)")
    parser.add_argument("--data", help="its records (default: the demo's)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--work", help="keep the records, the model and what the rounds "
                                       "write here")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix=prefix))
    work.mkdir(parents=True, exist_ok=True)
    data = Path(args.data) if args.data else demo_records(work)
    return args, work, data, sample_model(work, data, args.model_dir)


def sample_model(work: Path, data: Path, model_dir: str | None) -> Path:
    """`model_dir` if given, else the sample model trained 300 steps on `data` into
    `work`/model (once per work folder)."""
    if model_dir:
        return Path(model_dir)
    model = work / "model"
    if not (model / "odapi_train.json").exists():
        subprocess.run([sys.executable, "-m", "odapi_operators", "train", "--model-config",
                        str(SAMPLE_MODEL), "--data", str(data), "--out", str(model),
                        "--steps", "300", "--batch-size", "8", "--no-warm-start"],
                       check=True, stdout=subprocess.DEVNULL)
    return model


def timed(command: list[str]) -> tuple[float, str]:
    """Run `command` to its end: (seconds from launch to exit, its stdout); a failure ends the
    benchmark with the command's stderr."""
    started = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{' '.join(command[:5])} ... failed:\n{done.stderr[-3000:]}")
    return time.monotonic() - started, done.stdout


def load() -> str:
    """The load average, printed beside every timing (2-core machines are noisy)."""
    return " ".join(f"{value:.2f}" for value in os.getloadavg())
