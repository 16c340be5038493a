"""The demo's records for benchmarks that train or evaluate the sample model.

`odapi sample --count 200 --seed 0`, ingested, fetched, verified at max side 640, and written as
the pipeline does by default: 80/20 split by image key (39 val images), one shard per split.
Made once per work folder and reused.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_MODEL = ROOT / "include/configs/models/retinanet_mobile_sample.yaml"


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


def newest_checkpoint(model_dir: str | Path) -> str:
    """The newest checkpoint prefix, from the `checkpoint` state file (no TensorFlow here)."""
    state = (Path(model_dir) / "checkpoint").read_text()
    return str(Path(model_dir) / state.split("model_checkpoint_path:", 1)[1].split('"')[1])


def load() -> str:
    """The load average, printed beside every timing (2-core machines are noisy)."""
    return " ".join(f"{value:.2f}" for value in os.getloadavg())
