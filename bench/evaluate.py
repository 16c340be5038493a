"""Evaluation cost: `odapi evaluate` against the bare cost of loading the model, running it on
the same val images and scoring with pycocotools.

Two baselines, each in a fresh process with no odapi code, from the params.yaml the training
wrote and its newest checkpoint:
- minimal: TF-Vision's serving `DetectionModule` restored from the checkpoint, run one image
  at a time on the val records' images, ground truth read from the records, pycocotools'
  COCOeval: the bare cost of loading the model, inference and pycocotools;
- TF-Vision's own evaluation loop without its controller: `task.build_model()`,
  `task.build_inputs(validation_data)` (batches of 8), `validation_step` under one
  tf.function, and the task's COCO evaluator over the logs. `odapi evaluate`
does more on the same images: the record-derived ground truth checks, the `all` / `new` / `old`
slices, per-class AP, and the per-image matches the gate's bootstrap resamples.
Both run in fresh child processes, alternating, timed from launch to exit. Prints medians, the
ratio odapi / each baseline (goal <= 1.5), and the AP50s (they should agree closely).

    .venv/bin/python bench/evaluate.py [--model-dir DIR] [--rounds 3] [--work DIR]

Without --model-dir it first trains the sample model 300 steps on the demo's records.
"""

from __future__ import annotations

import json
import statistics
import sys

from _common import BARE_PRELUDE, load, model_inputs, timed, use_this_tree

use_this_tree()

from odapi_operators.core.model.tfvision import newest_checkpoint  # noqa: E402

# The baseline child: argv = experiment, params.yaml, checkpoint. Prints its AP50.
BARE_EVAL = BARE_PRELUDE + """
import json
from official.core import task_factory

experiment, params_yaml, checkpoint = sys.argv[1:]
params = bare_params(experiment, params_yaml)
task = task_factory.get_task(params.task)
model = task.build_model()
tf.train.Checkpoint(model=model).read(checkpoint).expect_partial()
metrics = task.build_metrics(training=False)
step = tf.function(lambda inputs: task.validation_step(inputs, model))
logs = None
for inputs in task.build_inputs(params.task.validation_data):
    logs = task.aggregate_logs(logs, step(inputs))
print(json.dumps({"AP50": float(task.reduce_aggregated_logs(logs)["AP50"])}))
"""

# The minimal baseline child: argv = experiment, params.yaml, checkpoint, val records pattern.
# TF-Vision's serving module (no training graph, no losses), one image at a time, ground truth
# read from the records, pycocotools' COCOeval. Prints its AP50.
MINIMAL_EVAL = BARE_PRELUDE + """
import contextlib, io, json
from official.vision.serving import detection
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

experiment, params_yaml, checkpoint, pattern = sys.argv[1:]
params = bare_params(experiment, params_yaml)
params.task.export_config.output_normalized_coordinates = True
module = detection.DetectionModule(params, batch_size=1,
                                   input_image_size=list(params.task.model.input_size[:2]))
tf.train.Checkpoint(model=module.model).read(checkpoint).expect_partial()
infer = tf.function(module.inference_from_image_tensors).get_concrete_function(
    tf.TensorSpec([1, None, None, 3], tf.uint8))
images, truth, found = [], [], []
for i, record in enumerate(tf.data.TFRecordDataset(sorted(tf.io.gfile.glob(pattern)))):
    f = tf.train.Example.FromString(record.numpy()).features.feature
    image = tf.io.decode_image(f["image/encoded"].bytes_list.value[0], channels=3)
    h, w = int(image.shape[0]), int(image.shape[1])
    images.append({"id": i, "height": h, "width": w})
    v = lambda key: f[key].float_list.value
    for x0, y0, x1, y1, c in zip(v("image/object/bbox/xmin"), v("image/object/bbox/ymin"),
                                 v("image/object/bbox/xmax"), v("image/object/bbox/ymax"),
                                 f["image/object/class/label"].int64_list.value):
        truth.append({"id": len(truth) + 1, "image_id": i, "category_id": int(c), "iscrowd": 0,
                      "bbox": [x0 * w, y0 * h, (x1 - x0) * w, (y1 - y0) * h],
                      "area": (x1 - x0) * w * (y1 - y0) * h})
    out = infer(image[None])
    n = int(out["num_detections"][0])
    for (y0, x0, y1, x1), score, c in zip(out["detection_boxes"][0][:n].numpy(),
                                          out["detection_scores"][0][:n].numpy(),
                                          out["detection_classes"][0][:n].numpy()):
        found.append({"image_id": i, "category_id": int(c), "score": float(score),
                      "bbox": [x0 * w, y0 * h, (x1 - x0) * w, (y1 - y0) * h]})
gt = COCO()
gt.dataset = {"images": images, "annotations": truth,
              "categories": [{"id": c} for c in sorted({a["category_id"] for a in truth})]}
with contextlib.redirect_stdout(io.StringIO()):
    gt.createIndex()
    ap50 = 0.0
    if found:
        coco = COCOeval(gt, gt.loadRes(found), "bbox")
        coco.evaluate(); coco.accumulate(); coco.summarize()
        ap50 = float(coco.stats[1])
print(json.dumps({"AP50": ap50}))
"""


def main() -> None:
    args, work, data, model_dir = model_inputs(__doc__, "odapi-bench-eval-")
    experiment = json.loads((model_dir / "odapi_train.json").read_text())["experiment"]
    odapi = [sys.executable, "-m", "odapi_operators", "evaluate", "--model", str(model_dir),
             "--data", str(data), "--out"]
    params = str(model_dir / "params.yaml")
    val = json.loads((data / "summary.json").read_text())["splits"]["val"]["pattern"]
    baselines = {
        "minimal (serving module)": [sys.executable, "-c", MINIMAL_EVAL, experiment, params,
                                     newest_checkpoint(model_dir), val],
        "TF-Vision eval loop": [sys.executable, "-c", BARE_EVAL, experiment, params,
                                newest_checkpoint(model_dir)]}
    print(f"load average before: {load()}", flush=True)
    times: dict[str, list[float]] = {"odapi evaluate": [], **{name: [] for name in baselines}}
    ap50: dict[str, float] = {}
    for round_ in range(args.rounds):
        out = work / f"eval-{round_}"
        seconds, _ = timed([*odapi, str(out)])
        times["odapi evaluate"].append(seconds)
        ap50["odapi evaluate"] = json.loads((out / "metrics.json").read_text())["AP50"]
        for name, command in baselines.items():
            seconds, printed = timed(command)
            times[name].append(seconds)
            ap50[name] = json.loads(printed.strip().splitlines()[-1])["AP50"]
        print(f"round {round_ + 1}: " + ", ".join(f"{name} {values[-1]:.1f} s" for name, values
                                                  in times.items()) + f" (load {load()})",
              flush=True)
    medians = {name: statistics.median(values) for name, values in times.items()}
    for name, value in medians.items():
        runs = ", ".join(f"{v:.1f}" for v in times[name])
        print(f"{name:>25}: {value:6.1f} s median (runs: {runs}); AP50 {ap50[name]:.3f}")
    print(f"load average after: {load()}")
    for name in baselines:
        print(f"ratio odapi evaluate / {name}: "
              f"{medians['odapi evaluate'] / medians[name]:.2f} (goal <= 1.5)")


if __name__ == "__main__":
    main()
