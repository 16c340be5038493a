"""Benchmark: does continuous training keep what it learned, and does the gate catch forgetting?

Three sample exports land one after the other, each different from the last:

    b1: circles, squares and triangles (the sample generator's default look);
    b2: adds a class, diamonds;
    b3: smaller objects in light colours.

After each export lands, three models are trained:

    (a) continuous odapi: the pipeline's own stages (select_exports -> ingest -> fetch ->
        verify -> label_map -> shard) build the cumulative dataset version, and training
        starts from the previous (a) model with the warm-start budget (--warm-steps),
        fine-tuning (train.warm_start_lr_factor; the whole model kept, a new class's logits
        starting at the prior);
    (b) scratch on the union of all exports so far, at the same total steps as (a) so far;
    (c) the latest export alone: a start from the previous (a) model like (a)'s, trained on
        the records of the latest export only (the one-shot pipeline of before).

Each is evaluated on the cumulative val split, and AP50 is reported per export's val images
(by image key). (c) and (a) are gated against the previous (a) model, as production, with
the pipeline's gate: an absolute AP50 bound (--min-ap50) refuses a useless model, and the
`old` / `new` slice checks come from the dataset version's diff.
Goals: (a) within 0.02 AP50 of (b) on every earlier export; (a) promoted, (c) refused on `old`.

Seven trainings (3 x --steps + 7 x --warm-steps steps in all) and nine evaluations: with
the defaults 2850 steps, about 25 min on 2 quiet cores if a step takes 0.3 s (estimated, not
measured quiet); at load 10-13 a step took 1.4-1.7 s (run 1's 600 steps: 1014 s).
A smoke run:

    .venv/bin/python bench/continuous.py --images 24 --steps 20 --warm-steps 10 --min-ap50 0

Not run by bench/run.py (see ON_DEMAND there).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_MODEL = ROOT / "include/configs/models/retinanet_mobile_sample.yaml"
SPLIT = {"train": 0.75, "val": 0.25}
EXPORTS = {  # name: (seed, look)
    "b1": (11, {}),
    "b2": (12, {"classes": ("circle", "square", "triangle", "diamond")}),
    "b3": (13, {"classes": ("circle", "square", "triangle", "diamond"),
                "sizes": (0.15, 0.3), "palette": "light"}),
}


def child(args: list[str]) -> dict:
    """`odapi ARGS` in a child process; only its progress lines are shown."""
    from odapi_operators.core.stages.child import run_json

    return run_json(args, lambda line: line.startswith("progress:") and print(
        f"      {line}", flush=True))


def land(work: Path, name: str, images: int) -> Path:
    """Write export `name` into the watched folder, marker last (it lands now)."""
    from odapi_operators.core.data.sample_data import Look, generate

    seed, look = EXPORTS[name]
    export = work / "exports" / name
    generate(export, count=images, seed=seed, prefix=name, look=Look(**look))
    return export


def pipeline_yaml(work: Path, steps: int, warm_steps: int, min_ap50: float) -> Path:
    config = {"home": str(work),
              "exports": {"path": "exports", "unknown_classes": "add"},
              "images": {"max_side": 160},
              "records": {"split": SPLIT, "shards": {"train": 1, "val": 1}, "cache": None},
              "train": {"model_config": str(SAMPLE_MODEL), "steps": steps, "batch_size": 8,
                        "warm_start": True, "warm_start_steps": warm_steps},
              "evaluate": {"missing_classes": "warn"},
              # a useless model is refused outright; forgetting is refused on what production
              # knew; learning is asked on the new
              "gate": {"min_ap50": min_ap50,
                       "slices": [{"slice": "old", "metric": "AP50", "min_delta": -0.02},
                                  {"slice": "new", "metric": "AP50", "min_delta": 0.0}]},
              "serving": {"base": "serving", "model_name": "shapes"}}
    path = work / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def prepare_run(pipeline: Path, run_id: str, production: Path | None) -> tuple[str, str]:
    """The pipeline's data stages for one run: (records folder, dataset diff or None). The
    label map extends `production`'s (the model dir of (a)'s last run; this bench serves
    nothing, so the stage would not find it), as the DAG's does the served model's: ids are
    never renumbered."""
    from odapi_operators.core.stages.runner import run_stage

    config = str(pipeline)
    exports = sorted(str(p) for p in (pipeline.parent / "exports").iterdir())
    chosen = run_stage("select_exports", pipeline=config, run_id=run_id,
                       inputs={"candidates": exports}, log=lambda _: None)
    ingested = run_stage("ingest", pipeline=config, run_id=run_id,
                         inputs={"exports": chosen.exports}, log=print)
    fetched = run_stage("fetch", pipeline=config, run_id=run_id,
                        inputs={"manifest": ingested.manifest}, log=lambda _: None)
    verified = run_stage("verify", pipeline=config, run_id=run_id,
                         inputs={"manifest": fetched.manifest}, log=lambda _: None)
    previous = production / "label_map.pbtxt" if production else None
    label_map = run_stage("label_map", pipeline=config, run_id=run_id,
                          inputs={"manifest": verified.manifest,
                                  "previous": str(previous) if previous else None},
                          log=lambda _: None)
    records = run_stage("shard", pipeline=config, run_id=run_id,
                        inputs={"manifest": verified.manifest,
                                "label_map": label_map.label_map}, log=lambda _: None)
    return records.data, ingested.diff


def latest_only(export: Path, label_map: str, work: Path) -> str:
    """Records of one export alone, with the cumulative label map's ids (model (c))."""
    from odapi_operators.core.data.ingest import ingest
    from odapi_operators.core.data.prepare import fetch_and_verify
    from odapi_operators.core.data.shard import write_shards

    ingest([str(export)], work / "ingest", label_map=label_map)
    _, verified = fetch_and_verify(work / "ingest" / "manifest.jsonl", work / "prepared",
                                   max_side=160)
    write_shards(verified["manifest"], label_map, work / "records", SPLIT,
                 {"train": 1, "val": 1})
    return str(work / "records")


def train(name: str, data: str, out: Path, steps: int, start: Path | None,
          lr_factor: float | None) -> dict:
    """One training; a start from a model of ours fine-tunes (train.warm_start_lr_factor)."""
    args = ["train", "--model-config", str(SAMPLE_MODEL), "--data", data, "--out", str(out),
            "--steps", str(steps), "--batch-size", "8", "--no-warm-start"]
    if start:
        args += ["--init-checkpoint", str(start)]
        if lr_factor:
            args += ["--warm-start-lr-factor", str(lr_factor)]
    print(f"    train {name}: {steps} steps from {start or 'scratch'}", flush=True)
    summary = child(args)
    rate = summary["start"]["learning_rate"]
    print(f"      {summary['seconds']:.0f} s; restored {summary['start'].get('modules', '-')}; "
          f"peak lr {rate['peak']:.4f}, warm-up {rate['warmup_steps']} steps", flush=True)
    return summary


def evaluate(model: Path, data: str, out: Path, diff: str) -> Path:
    child(["evaluate", "--model", str(model), "--data", data, "--out", str(out),
           "--missing-classes", "warn", "--diff", diff])
    return out


def ap50_by_export(eval_dir: Path, data: str) -> dict[str, float | None]:
    """AP50 of one evaluation on each export's val images (an image's key names its export)."""
    from odapi_operators.core.evaluation.coco_metrics import coco_metrics

    keys = {int(i): e["key"] for i, e in json.loads(
        (Path(data) / "source_ids.json").read_text()).items()}
    gt = json.loads((eval_dir / "ground_truth.json").read_text())
    detections = json.loads((eval_dir / "detections.json").read_text())
    scores: dict[str, float | None] = {}
    for name in EXPORTS:
        ids = {image["id"] for image in gt["images"] if keys[image["id"]].startswith(name)}
        if not ids:
            continue
        subset = {**gt, "images": [i for i in gt["images"] if i["id"] in ids],
                  "annotations": [a for a in gt["annotations"] if a["image_id"] in ids]}
        found = coco_metrics(subset, [d for d in detections if d["image_id"] in ids])
        scores[name] = found.get("AP50")
    return scores


def gate(candidate: Path, production: Path, pipeline: Path, out: Path) -> dict:
    """The pipeline's gate, production = the previous (a) model on the same slices."""
    child(["gate", "--pipeline", str(pipeline), "--metrics", str(candidate / "metrics.json"),
           "--baseline-version", "1", "--baseline-metrics", str(production / "metrics.json"),
           "--out", str(out)])
    return json.loads((out / "decision.json").read_text())


def slice_verdicts(decision: dict) -> str:
    checks = [c for c in decision.get("checks", []) if c.get("kind") == "slice"]
    parts = [f"{c['slice']} {c['metric']} {c['delta']:+.3f} "
             f"[{c['interval'][0]:+.3f}, {c['interval'][1]:+.3f}] "
             f"{'ok' if c['passed'] else 'REFUSED'}"
             for c in checks if c.get("interval") and c.get("delta") is not None]
    return ("promoted" if decision["promoted"] else "refused") + (
        ": " + "; ".join(parts) if parts else "")


def row(run_id: str, model: str, scores: dict, decision: dict) -> str:
    cells = " ".join(f"{scores[n]:7.3f}" if scores.get(n) is not None else f"{'-':>7}"
                     for n in EXPORTS)
    return f"{run_id:6} {model:11} {cells}  {slice_verdicts(decision) if decision else ''}"


def goals(rows: list[tuple]) -> list[str]:
    """The benchmark's verdicts: (a) within 0.02 AP50 of (b) on every earlier export, (a)
    promoted and (c) refused on the `old` slice, per run after the first."""
    lines = []
    by_run: dict[str, dict[str, tuple]] = {}
    for run_id, m, scores, decision in rows:
        by_run.setdefault(run_id, {})[m] = (scores, decision)
    for k, (run_id, models) in enumerate(by_run.items(), 1):
        if "b" not in models:
            continue
        (a, a_decision), (b, _), (_, c_decision) = models["a"], models["b"], models["c"]
        gaps = {n: a[n] - b[n] for n in a if a.get(n) is not None and b.get(n) is not None}
        earlier = [gaps[n] for n in list(EXPORTS)[:k - 1] if n in gaps]
        lines.append(f"{run_id}: (a) - (b) " + ", ".join(f"{n} {g:+.3f}" for n, g in gaps.items())
                     + ("  ok" if min(earlier) >= -0.02 else "  MISSED")
                     + " (on the earlier exports)")
        c_old = [c for c in c_decision.get("checks", [])
                 if c.get("kind") == "slice" and c.get("slice") == "old"]
        c_refused = any(not c["passed"] for c in c_old)
        lines.append(f"{run_id}: (a) {'promoted' if a_decision['promoted'] else 'REFUSED'}; "
                     f"(c) {'refused' if c_refused else 'NOT refused'} on old, "
                     f"{'promoted' if c_decision['promoted'] else 'refused'} overall")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200, help="images per export")
    parser.add_argument("--steps", type=int, default=800, help="steps of the first training")
    parser.add_argument("--warm-steps", type=int, default=300,
                        help="steps of each later (warm-started) training")
    parser.add_argument("--warm-lr-factor", type=float,
                        help="train.warm_start_lr_factor (default: the pipeline's)")
    parser.add_argument("--min-ap50", type=float, default=0.3,
                        help="the gate's absolute AP50 bound (all val images)")
    parser.add_argument("--work", help="keep everything here (default: a temporary folder)")
    args = parser.parse_args()
    began = time.monotonic()
    work = Path(args.work or tempfile.mkdtemp(prefix="odapi-continuous-"))
    if work.exists() and args.work:
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    pipeline = pipeline_yaml(work, args.steps, args.warm_steps, args.min_ap50)
    rows: list[tuple] = []
    previous: Path | None = None
    total = 0
    for k, name in enumerate(EXPORTS, 1):
        export = land(work, name, args.images)
        run_id = f"run-{k}"
        print(f"== {name} landed; {run_id}", flush=True)
        data, diff = prepare_run(pipeline, run_id, previous)
        steps = args.steps if previous is None else args.warm_steps
        total += steps
        models = {"a": work / "a" / run_id}
        train("(a) continuous", data, models["a"], steps, previous, args.warm_lr_factor)
        if previous is not None:
            models["b"] = work / "b" / run_id
            train("(b) scratch on the union", data, models["b"], total, None, None)
            label_map = json.loads((Path(data) / "summary.json").read_text())["label_map"]
            alone = latest_only(export, label_map, work / "c-data" / run_id)
            models["c"] = work / "c" / run_id
            train("(c) latest export alone", alone, models["c"], args.warm_steps, previous,
                  args.warm_lr_factor)
        evals = {m: evaluate(path, data, work / "eval" / run_id / m, diff)
                 for m, path in models.items()}
        if previous is not None:
            evals["production"] = evaluate(previous, data, work / "eval" / run_id / "prod", diff)
        for m, eval_dir in evals.items():
            decision: dict = {}
            if previous is not None and m in ("a", "c"):
                decision = gate(eval_dir, evals["production"], pipeline,
                                work / "gate" / run_id / m)
            rows.append((run_id, m, ap50_by_export(eval_dir, data), decision))
            print(f"    {row(*rows[-1])}", flush=True)
        previous = models["a"]
    print(f"\n{'run':6} {'model':11} " + " ".join(f"{n:>7}" for n in EXPORTS) + "  gate")
    for found in rows:
        print(row(*found))
    print()
    for line in goals(rows):
        print(line)
    print(f"\n{time.monotonic() - began:.0f} s; work folder: {work}")


if __name__ == "__main__":
    sys.exit(main())
