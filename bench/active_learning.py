"""Benchmark: does active-learning selection beat random selection for the next labels?

On the sample data (the generator's boxes are the truth), one run of the real loop:

1. train a model on --train-images labeled images (`odapi train`, --steps steps), export it
   and push it to a throw-away serving base as the production model;
2. pre-annotate a pool of --pool unlabeled images with it (`preannotate`) and take the top
   --k by active learning; take --k at random (same K, --seed) as the baseline;
3. "label" each selection with the generator's true boxes, retrain from the production
   model (warm start, same --steps) on initial + selected images;
4. evaluate the starting model and both retrained models on one fixed val split; print AP50.

Expensive (three trainings of --steps, ~0.3 s a step on 2 quiet cores): the defaults take
~15-20 min. The smoke run below takes ~6 min on a busy machine:

    .venv/bin/python bench/active_learning.py --steps 5 --pool 20 --k 5 --train-images 16 \
        --val-images 8

Not run by bench/run.py (see ON_DEMAND there).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_MODEL = ROOT / "include/configs/models/retinanet_mobile_sample.yaml"
ALL_TRAIN = {"train": 1.0, "val": 0.0}
ALL_VAL = {"train": 0.0, "val": 1.0}
ONE_SHARD = {"train": 1, "val": 1}


def child(args: list[str]) -> dict:
    """`odapi ARGS` in a child process; only its progress lines are shown."""
    from odapi_operators.core.stages.child import run_json

    return run_json(args, lambda line: line.startswith("progress:") and print(
        f"    {line}", flush=True))


def labeled_images(export: Path, work: Path) -> Path:
    """Generator export -> ingest -> fetch + verify: the verified manifest (true boxes)."""
    from odapi_operators.core.data.ingest import ingest
    from odapi_operators.core.data.prepare import fetch_and_verify

    ingest([str(export)], work / "ingest")
    _, verified = fetch_and_verify(work / "ingest" / "manifest.jsonl", work / "prepared")
    return Path(verified["manifest"])


def records(manifest: Path, label_map: Path, out: Path, ratios: dict) -> str:
    from odapi_operators.core.data.shard import write_shards

    write_shards(manifest, label_map, out, ratios, ONE_SHARD)
    return str(out)


def train_and_evaluate(name: str, data: str, eval_data: str, work: Path, steps: int,
                       batch_size: int, warm_start: str | None = None) -> tuple[Path, float]:
    model = work / f"model-{name}"
    args = ["train", "--model-config", str(SAMPLE_MODEL), "--data", data, "--out", str(model),
            "--steps", str(steps), "--batch-size", str(batch_size)]
    print(f"  train {name} ({steps} steps{', warm start' if warm_start else ''})", flush=True)
    child(args + (["--warm-start", "--warm-start-from", warm_start] if warm_start else []))
    metrics = child(["evaluate", "--model", str(model), "--data", eval_data, "--out",
                     str(work / f"eval-{name}"), "--missing-classes", "warn"])
    return model, float(metrics.get("AP50") or 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600, help="steps of every training")
    parser.add_argument("--pool", type=int, default=300, help="unlabeled images")
    parser.add_argument("--k", type=int, default=60, help="images to label")
    parser.add_argument("--train-images", type=int, default=60, help="initial labeled images")
    parser.add_argument("--val-images", type=int, default=80)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", help="keep everything here (default: a temporary folder)")
    args = parser.parse_args()

    from odapi_operators.core.data.label_map import format_label_map
    from odapi_operators.core.data.manifest import read_manifest, write_manifest
    from odapi_operators.core.data.sample_data import CLASSES, generate
    from odapi_operators.core.labeling.preannotate import (
        SCORES_FILE,
        PreannotateOptions,
        preannotate,
    )
    from odapi_operators.core.labeling.predictors import open_predictor, resolve_model
    from odapi_operators.core.serving.promote import promote
    from odapi_operators.core.serving.push import push
    from odapi_operators.core.serving.serving_dir import model_dir

    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="odapi-bench-al-") as tmp:
        work = Path(args.work or tmp)
        label_map = work / "label_map.pbtxt"
        work.mkdir(parents=True, exist_ok=True)
        label_map.write_text(format_label_map({c: i for i, c in enumerate(CLASSES, 1)}))
        print("data: initial, val and pool images with their true boxes", flush=True)
        generate(work / "initial", count=args.train_images, seed=args.seed, max_side=128)
        generate(work / "val", count=args.val_images, seed=args.seed + 1, max_side=128)
        generate(work / "unlabeled" / "pool", count=args.pool, seed=args.seed + 2,
                 max_side=128, marker=None)  # keys pool__shapes_*: never an initial key
        initial = list(read_manifest(labeled_images(work / "initial", work / "initial-data")))
        truth = {r.key: r for r in read_manifest(labeled_images(work / "unlabeled",
                                                                work / "pool-data"))}
        eval_data = records(labeled_images(work / "val", work / "val-data"), label_map,
                            work / "records-val", ALL_VAL)
        write_manifest(work / "initial.jsonl", initial)
        data0 = records(work / "initial.jsonl", label_map, work / "records-initial", ALL_TRAIN)

        model0, ap_start = train_and_evaluate("initial", data0, eval_data, work, args.steps,
                                              args.batch_size)
        child(["export", "--model-dir", str(model0), "--data", eval_data, "--out",
               str(work / "export"), "--input-type", "image_bytes", "--model-name", "shapes"])
        serving = work / "serving"
        promote(serving, "shapes", push(work / "export" / "saved_model", serving, "shapes",
                                        "bench")["version"])

        print(f"select: {args.k} of {args.pool} by active learning, {args.k} at random",
              flush=True)
        predictor = open_predictor(resolve_model(model_dir(serving, "shapes")))
        summary = preannotate(str(work / "unlabeled"), work / "al" / "batch", predictor,
                              options=PreannotateOptions(top_k=args.k))
        predictor.close()
        lines = [json.loads(line) for line in
                 (work / "al" / "batch" / SCORES_FILE).read_text().splitlines()]
        chosen = {"active": [l["key"] for l in lines if l["status"] == "selected"],
                  "random": random.Random(args.seed).sample(sorted(truth), args.k)}
        results = {"start": ap_start}
        for name, keys in chosen.items():
            write_manifest(work / f"{name}.jsonl", initial + [truth[k] for k in keys])
            data = records(work / f"{name}.jsonl", label_map, work / f"records-{name}",
                           ALL_TRAIN)
            _, results[name] = train_and_evaluate(name, data, eval_data, work, args.steps,
                                                  args.batch_size,
                                                  warm_start=model_dir(serving, "shapes"))
        boxes = {name: sum(len(truth[k].boxes) for k in keys) for name, keys in chosen.items()}
    print(f"\n{args.train_images} initial images, pool {args.pool}, K {args.k}, "
          f"{args.steps} steps each, seed {args.seed}; val {args.val_images} images; "
          f"pre-annotation {summary['images_per_s']} images/s; "
          f"{time.monotonic() - started:.0f} s in all")
    print(f"  AP50 starting model              {results['start']:.3f}")
    print(f"  AP50 + {args.k} by active learning   {results['active']:.3f} "
          f"({boxes['active']} boxes labeled)")
    print(f"  AP50 + {args.k} at random            {results['random']:.3f} "
          f"({boxes['random']} boxes labeled)")


if __name__ == "__main__":
    sys.exit(main())
