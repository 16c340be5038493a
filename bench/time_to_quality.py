"""Benchmark: how soon does the sample model reach AP50 0.9 on the sample val split?

For each recipe (a set of overrides of the sample model config) and each seed, one real
`odapi train` in a child process on the demo's data (`odapi sample --count 200 --seed 0`, the
pipeline's 80/20 split: 39 val images), keeping a checkpoint every --every steps; then every
checkpoint is scored (AP50, pycocotools) in one child process. A checkpoint's time is its
file's time minus the training's launch, so start-up and graph tracing count. Prints AP50
against training seconds for each recipe side by side, the first second at which AP50 >= the
target, and the worst seed per recipe (the goal: <= --budget seconds on every seed).

    .venv/bin/python bench/time_to_quality.py                      # before vs now, 3 seeds
    .venv/bin/python bench/time_to_quality.py --recipes now --seeds 0 --steps 600
    .venv/bin/python bench/time_to_quality.py --before-seeds 0     # one seed of the old recipe

Seeds vary the shuffling and the augmentation (task.train_data.seed) and TensorFlow's global
seed (the weights' initialisation), so the three runs differ the way repeated demos do.
Not run by bench/run.py (see ON_DEMAND there): 6 trainings of a few minutes each.
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from _common import ROOT, SAMPLE_MODEL, demo_records


# The recipe of stop 23 (AP50 0.66-0.96 after 1800 steps), as overrides of today's file.
BEFORE = {"batch_size": 8, "steps": 1800, "params": {
    "task": {"model": {"input_size": [128, 128, 3], "min_level": 3, "max_level": 7,
                       "backbone": {"spinenet_mobile": {"min_level": 3, "max_level": 7}},
                       "anchor": {"anchor_size": 3, "num_scales": 3,
                                  "aspect_ratios": [0.5, 1.0, 2.0]}},
             "train_data": {"parser": {"aug_scale_min": 0.8, "aug_scale_max": 1.2}}},
    "trainer": {"steps_per_loop": 50, "optimizer_config": {
        "optimizer": {"type": "sgd", "sgd": {"momentum": 0.9}},
        "learning_rate": {"type": "cosine", "cosine": {"initial_learning_rate": 0.08}},
        "warmup": {"type": "linear", "linear": {"warmup_steps": 100,
                                                "warmup_learning_rate": 0.0067}}}}}}
# Today's file as it is, with the pipeline's default steps.
NOW = {"batch_size": 8, "steps": None, "params": {}}
RECIPES: dict[str, dict] = {"before": BEFORE, "now": NOW}


def merge(base: dict, overrides: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def default_steps() -> int:
    return yaml.safe_load((ROOT / "include/configs/pipeline.yaml").read_text())["train"]["steps"]


def recipe_config(name: str, recipe: dict, seed: int, every: int, folder: Path) -> Path:
    """The sample config with `recipe`'s overrides, a checkpoint every `every` steps, all
    kept, and `seed` for the input pipeline."""
    config = merge(yaml.safe_load(SAMPLE_MODEL.read_text()), {"params": recipe["params"]})
    config = merge(config, {"params": {
        "task": {"train_data": {"seed": seed}},
        "trainer": {"checkpoint_interval": every, "max_to_keep": 1000}}})
    path = folder / f"{name}-{seed}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def train(config: Path, data: Path, out: Path, steps: int, batch_size: int, seed: int) -> float:
    """One `odapi train`; returns its launch time (the epoch seconds checkpoints count from)."""
    code = ("import sys, tensorflow as tf; tf.random.set_seed(int(sys.argv[1])); "
            "from odapi_operators.cli import main; sys.exit(main(sys.argv[2:]))")
    launched = time.time()
    subprocess.run([sys.executable, "-c", code, str(seed), "train", "--model-config",
                    str(config), "--data", str(data), "--out", str(out), "--steps", str(steps),
                    "--batch-size", str(batch_size), "--no-warm-start"],
                   check=True, stdout=subprocess.DEVNULL)
    return launched


def curve(model_dir: Path, data: Path) -> list[tuple[int, float]]:
    """(step, AP50) of every checkpoint in `model_dir` (run in a child: it holds TF)."""
    done = subprocess.run([sys.executable, __file__, "--curve", str(model_dir), str(data)],
                          check=True, capture_output=True, text=True)
    return [tuple(p) for p in json.loads(done.stdout.strip().splitlines()[-1])]


def score_checkpoints(model_dir: str, data: str) -> None:
    """Child: one model, every checkpoint restored into it in turn, scored on the val split."""
    import tensorflow as tf

    from odapi_operators.core.evaluation.coco_metrics import (coco_metrics, detection_entries,
                                                               ground_truth)
    from odapi_operators.core.evaluation.evaluate import val_split
    from odapi_operators.core.model import tfvision
    from odapi_operators.core.model.detector import unbatch
    from odapi_operators.core.model.export_module import export_module
    from odapi_operators.core.model.saved_model import request_input

    tfvision.setup_tensorflow()
    examples, label_map = val_split(data)
    gt = ground_truth(examples, label_map)
    module = export_module(tfvision.load_params(model_dir))
    function = module.inference_from_image_tensors.get_concrete_function(
        tf.TensorSpec([None, None, None, 3], tf.uint8))
    inputs = [tf.constant(request_input(e, "image_tensor")) for e in examples]
    points = []
    for path in tf.train.get_checkpoint_state(model_dir).all_model_checkpoint_paths:
        tf.train.Checkpoint(model=module.model).read(path).expect_partial()
        detections = []
        for image, tensor in zip(gt["images"], inputs):
            found = unbatch(function(tensor), True)[0]
            detections += detection_entries(image, found.boxes, found.scores, found.classes)
        points.append((tfvision.checkpoint_step(path), coco_metrics(gt, detections)["AP50"]))
    print(json.dumps(points))


def seconds_of(model_dir: Path, step: int, launched: float) -> float:
    return (model_dir / f"ckpt-{step}.index").stat().st_mtime - launched


def run(args: argparse.Namespace) -> None:
    work = Path(args.work or tempfile.mkdtemp(prefix="odapi-ttq-"))
    work.mkdir(parents=True, exist_ok=True)
    data = demo_records(work)
    results: dict[str, dict[int, list[tuple[int, float, float]]]] = {}
    for name in args.recipes:
        recipe = RECIPES[name]
        steps = args.steps or recipe["steps"] or default_steps()
        for seed in (args.before_seeds if name == "before" and args.before_seeds
                     else args.seeds):
            model_dir = work / "models" / f"{name}-{seed}"
            config = recipe_config(name, recipe, seed, args.every, work)
            launched = train(config, data, model_dir, steps, recipe["batch_size"], seed)
            points = [(step, seconds_of(model_dir, step, launched), ap)
                      for step, ap in curve(model_dir, data)]
            results.setdefault(name, {})[seed] = points
            reached = next((s for _, s, ap in points if ap >= args.target), None)
            print(f"{name} seed {seed}: {steps} steps; AP50 " + ", ".join(
                f"{ap:.3f}@{step}/{s:.0f}s" for step, s, ap in points)
                + f"; >= {args.target} at {reached and round(reached)} s", flush=True)
    report(results, args.target, args.budget)
    (work / "time_to_quality.json").write_text(json.dumps(results, indent=1))


def report(results: dict, target: float, budget: float) -> None:
    print(f"\nseconds to AP50 >= {target} (training launch to checkpoint; '-': not reached)")
    print(f"{'recipe':8} {'seeds: seconds':>30} {'worst':>8} "
          f"{'AP50 at ' + str(int(budget)) + ' s':>14}")
    worst = {}
    for name, seeds in results.items():
        reached = [next((s for _, s, ap in points if ap >= target), None)
                   for points in seeds.values()]
        at_budget = [max((ap for _, s, ap in points if s <= budget), default=0.0)
                     for points in seeds.values()]
        worst[name] = None if None in reached else max(reached)
        cells = ", ".join(f"{seed}: {r:.0f}" if r is not None else f"{seed}: -"
                          for seed, r in zip(seeds, reached))
        print(f"{name:8} {cells:>30} {worst[name] or float('nan'):8.0f} "
              f"{min(at_budget):14.3f}")
    names = list(results)
    if len(names) == 2 and all(worst.values()):
        print(f"\n{names[1]} / {names[0]}: {worst[names[1]] / worst[names[0]]:.2f}x the "
              "worst seed's seconds to the target")
    for name, value in worst.items():
        verdict = "ok" if value is not None and value <= budget else "MISSED"
        print(f"goal: {name} reaches {target} within {budget:.0f} s on every seed: {verdict}")


def main() -> None:
    if sys.argv[1:2] == ["--curve"]:
        return score_checkpoints(sys.argv[2], sys.argv[3])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="*", default=["before", "now"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, help="default: each recipe's own")
    parser.add_argument("--before-seeds", nargs="+", type=int,
                        help="seeds of the `before` recipe (default: --seeds)")
    parser.add_argument("--every", type=int, default=100, help="checkpoint every N steps")
    parser.add_argument("--target", type=float, default=0.9)
    parser.add_argument("--budget", type=float, default=300.0, help="seconds")
    parser.add_argument("--work", help="keep data and models here (data is reused)")
    parser.add_argument("--try", dest="tries", nargs=2, action="append", default=[],
                        metavar=("NAME", "JSON"), help="an extra recipe to measure: "
                        '{"batch_size": 8, "steps": 900, "params": {...overrides}}')
    args = parser.parse_args()
    for name, recipe in args.tries:
        RECIPES[name] = {"batch_size": 8, "steps": None, "params": {}, **json.loads(recipe)}
    args.recipes += [name for name, _ in args.tries]
    run(args)


if __name__ == "__main__":
    sys.exit(main())
