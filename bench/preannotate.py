"""Benchmark: pre-annotation throughput of the sample model, batched vs one image at a time.

The sample RetinaNet-mobile (batched NMS, as include/configs/models/retinanet_mobile_sample.yaml
sets it), trained a few steps on sample records and exported with image_bytes input (what
Serving gets over the wire), or any exported SavedModel given with --model. The pool: sample
images resized to one frame size, --max-side wide (a camera's pool; a model batch must share
one image size):

- batched: `Detector.detect_images` on --batch-size images per call (what `odapi preannotate`
  runs), in-run baseline naive: the same model called once per image;
- end to end: `preannotate()` on the pool (listing, hashing, dHash, model, ranking, tasks),
  as images/s; and on the generator's own mixed sizes, where batches form per size.

Variants alternate over --rounds rounds (the machine may be busy); rates are best of rounds.

    .venv/bin/python bench/preannotate.py [--images 96] [--max-side 320] [--batch-size 16]
                                          [--rounds 3] [--model SAVED_MODEL]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_MODEL = ROOT / "include/configs/models/retinanet_mobile_sample.yaml"


def build_model(root: Path) -> Path:
    """Sample records -> `odapi train` (a few steps) -> `odapi export` (image_bytes).

    Every detection is kept (no pre-NMS score threshold): a barely trained model would
    otherwise find nothing, and NMS would cost less than on a real model's 100 boxes.
    """
    import yaml

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
    quiet = lambda line: None  # noqa: E731
    run_json(["train", "--model-config", str(root / "model.yaml"), "--data", data, "--out",
              str(root / "model"), "--steps", "2", "--batch-size", "2"], quiet)
    run_json(["export", "--model-dir", str(root / "model"), "--data", data, "--out",
              str(root / "exported"), "--input-type", "image_bytes", "--model-name",
              "shapes"], quiet)
    return root / "exported" / "saved_model"


def rate(count: int, seconds: float) -> float:
    return count / seconds if seconds else float("inf")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--max-side", type=int, default=320)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", help="an exported SavedModel (default: build one)")
    args = parser.parse_args()

    from odapi_operators.core.data.sample_data import generate
    from odapi_operators.core.labeling.preannotate import PreannotateOptions, preannotate
    from odapi_operators.core.labeling.predictors import open_predictor, resolve_model

    with tempfile.TemporaryDirectory(prefix="odapi-bench-preannotate-") as tmp:
        root = Path(tmp)
        model = Path(args.model) if args.model else build_model(root)
        generate(root / "mixed", count=args.images, seed=1, max_side=args.max_side,
                 marker=None)
        frame = (args.max_side, args.max_side * 3 // 4)
        (root / "uniform").mkdir()
        for path in sorted((root / "mixed").glob("*.jpg")):
            with Image.open(path) as image:
                image.resize(frame).save(root / "uniform" / path.name, "JPEG", quality=90)
        images = [p.read_bytes() for p in sorted((root / "uniform").glob("*.jpg"))]
        ref = resolve_model(str(model))
        predictor = open_predictor(ref)
        detector = predictor.detector
        detector.detect_images(images[:args.batch_size])  # first calls build the graph
        detector.detect_images(images[:1])
        best = {"batched": 0.0, "naive": 0.0, "end to end": 0.0, "mixed sizes": 0.0}
        for round_ in range(args.rounds):
            start = time.perf_counter()
            for i in range(0, len(images), args.batch_size):
                detector.detect_images(images[i:i + args.batch_size])
            best["batched"] = max(best["batched"], rate(len(images), time.perf_counter() - start))
            start = time.perf_counter()
            for image in images:
                detector.detect_images([image])
            best["naive"] = max(best["naive"], rate(len(images), time.perf_counter() - start))
            for pool, name in (("uniform", "end to end"), ("mixed", "mixed sizes")):
                start = time.perf_counter()
                summary = preannotate(str(root / pool), root / f"{pool}-{round_}" / "batch",
                                      predictor, options=PreannotateOptions(
                                          top_k=args.images // 4, batch_size=args.batch_size))
                best[name] = max(best[name], rate(summary["scored"],
                                                  time.perf_counter() - start))
            print(f"round {round_ + 1}: " + ", ".join(f"{k} {v:.1f} img/s"
                                                      for k, v in best.items()), flush=True)
        predictor.close()
    print(f"model {model} ({ref.input_type}), {args.images} images of {frame[0]}x{frame[1]} "
          f"px, batch {args.batch_size}, best of {args.rounds}")
    print(f"  batched      {best['batched']:7.1f} images/s")
    print(f"  naive 1-by-1 {best['naive']:7.1f} images/s")
    print(f"  end to end   {best['end to end']:7.1f} images/s (preannotate: read, hash, "
          "model, rank, tasks)")
    print(f"  mixed sizes  {best['mixed sizes']:7.1f} images/s (end to end, the generator's "
          f"sizes {args.max_side * 3 // 4}-{args.max_side} px)")
    print(f"  batched / naive = {best['batched'] / best['naive']:.2f}x")


if __name__ == "__main__":
    sys.exit(main())
