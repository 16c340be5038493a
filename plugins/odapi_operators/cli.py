"""`odapi`: every pipeline stage on the command line, printing one JSON summary on stdout.

The Airflow operators run TensorFlow stages as `python -m odapi_operators <stage> ...` in a
child process: the same command a person debugging, or a KubernetesPodOperator, would run.
Exit status is 0 on success, 1 when the stage fails (the reason goes to stderr), 2 on usage.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable

from odapi_operators import cli_models, cli_preannotate, cli_report


def _pairs(text: str, cast: Callable[[str], Any]) -> dict[str, Any]:
    """'train=0.8,val=0.2' -> {'train': 0.8, 'val': 0.2}"""
    try:
        return {k.strip(): cast(v) for k, v in (item.split("=", 1) for item in text.split(","))}
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected name=value[,name=value...], got {text!r}")


def cmd_sample(args: argparse.Namespace) -> dict:
    from odapi_operators.core.data.sample_data import generate

    return generate(args.out, count=args.count, seed=args.seed, max_side=args.max_side)


def cmd_ingest(args: argparse.Namespace) -> dict:
    from odapi_operators.core.data.ingest import ingest

    options = {"classes": args.classes, "csv_columns": args.csv_columns,
               "csv_normalized": args.csv_normalized or None}
    return ingest(args.inputs, args.out, images_root=args.images_root, fmt=args.format,
                  options={k: v for k, v in options.items() if v},
                  label_map=args.label_map, unknown_classes=args.unknown_classes,
                  datasets_dir=args.datasets)


def _progress(args: argparse.Namespace) -> dict:
    """A bar on a terminal; otherwise a log line on stderr at a steady cadence."""
    if args.no_progress:
        return {}
    if sys.stderr.isatty():
        return {"bar": True}
    return {"log": lambda line: print(line, file=sys.stderr, flush=True)}


def _policy(args: argparse.Namespace):
    from odapi_operators.core.data.download import DownloadPolicy

    return DownloadPolicy(connect_timeout=args.connect_timeout, read_timeout=args.read_timeout,
                          deadline=args.deadline, retries=args.retries,
                          max_bytes=args.max_mb << 20)


def cmd_fetch(args: argparse.Namespace) -> dict:
    from odapi_operators.core.data.fetch import fetch_images, fetch_records

    options = dict(threads=args.threads, max_failed_share=args.max_failed_share,
                   policy=_policy(args), **_progress(args))
    if args.manifest:
        return fetch_images(args.manifest, args.out, **options)
    from odapi_operators.core.data.image_index import read_image_index
    from odapi_operators.core.rejections import RejectionLog

    logs: list[RejectionLog] = []

    def records():
        logs.append(RejectionLog())
        return read_image_index(args.index, logs[-1])

    try:  # images go straight into --out, named <key>.<ext>
        summary = fetch_records(records, args.out, files_dir=args.out, **options)
    finally:
        if logs:
            logs[-1].write(f"{args.out}/index-rejections.jsonl")
    summary["index_rejected"] = len(logs[-1])
    return summary


def cmd_verify(args: argparse.Namespace) -> dict:
    from odapi_operators.core.data.verify import verify_images

    return verify_images(args.manifest, args.out, max_side=args.max_side, workers=args.workers,
                         max_failed_share=args.max_failed_share, **_progress(args))


def cmd_prepare(args: argparse.Namespace) -> dict:
    from odapi_operators.core.data.prepare import prepare

    return prepare(args.manifest, args.out, ratios=args.split, shards=args.shards,
                   target_shard_bytes=args.target_shard_mb << 20, max_side=args.max_side,
                   threads=args.threads, workers=args.workers,
                   max_failed_share=args.max_failed_share, policy=_policy(args),
                   previous_label_map=args.previous_label_map, cache_dir=args.cache,
                   **_progress(args))


def cmd_label_map(args: argparse.Namespace) -> dict:
    from odapi_operators.core.data.label_map import build_label_map

    return build_label_map(args.manifest, args.out, previous=args.previous)


def cmd_shard(args: argparse.Namespace) -> dict:
    from odapi_operators.core.data.shard import write_shards

    return write_shards(args.manifest, args.label_map, args.out, args.split, args.shards,
                        target_shard_bytes=args.target_shard_mb << 20, workers=args.workers,
                        cache_dir=args.cache)


def _train_from_pipeline(args: argparse.Namespace) -> None:
    """Fill `odapi train` options from a run's frozen pipeline config (`--pipeline`): the
    command the train task runs, wherever it is placed (child process, Celery, pod)."""
    from odapi_operators.core.serving import serving_dir
    from odapi_operators.core.config import read_frozen_config
    from odapi_operators.core.layout import RunLayout, Stage

    pipeline = read_frozen_config(args.pipeline)
    if not args.run_id:
        raise ValueError("--pipeline needs --run-id (the model dir is the run's train folder)")
    train = pipeline.train
    args.config = args.config or train.model_config_path
    args.model_dir = args.model_dir or str(RunLayout(pipeline.runs, args.run_id).stage(
        Stage.TRAIN))
    args.steps = args.steps or train.steps
    args.batch_size = args.batch_size or train.batch_size
    args.init_checkpoint = args.init_checkpoint or train.init_checkpoint
    if train.warm_start and not args.warm_start_from and not args.init_checkpoint:
        args.warm_start_from = serving_dir.model_dir(pipeline.serving.base, pipeline.serving.model_name)


def cmd_train(args: argparse.Namespace) -> dict:
    from odapi_operators.core.model.train import train

    if args.pipeline:
        _train_from_pipeline(args)
    missing = [f"--{k.replace('_', '-')}" for k in ("config", "model_dir", "steps")
               if not getattr(args, k)]
    if missing:
        raise ValueError(f"missing {', '.join(missing)} (or give --pipeline and --run-id)")
    return train(args.config, args.data, args.model_dir, args.steps, args.batch_size or 8,
                 init_checkpoint=args.init_checkpoint, warm_start_from=args.warm_start_from)


def cmd_evaluate(args: argparse.Namespace) -> dict:
    from odapi_operators.core.evaluation.evaluate import evaluate

    return evaluate(args.model, args.data, args.out, min_images=args.min_images,
                    missing_classes=args.missing_classes)


def cmd_gate(args: argparse.Namespace) -> dict:
    from odapi_operators.core.evaluation.gate import gate

    return gate(args.metrics, args.out, args.min_ap50)


def cmd_export(args: argparse.Namespace) -> dict:
    from odapi_operators.core.model.exporter import export

    return export(args.model_dir, args.data, args.out, args.input_type,
                  model_name=args.model_name, extras=args.extra)


def cmd_push(args: argparse.Namespace) -> dict:
    from odapi_operators.core.serving.publish import push_and_promote
    from odapi_operators.core.serving.push import push
    from odapi_operators.core.serving.models_config import ServingOptions

    options = ServingOptions()
    if args.pipeline:
        from odapi_operators.core.config import read_frozen_config

        serving = read_frozen_config(args.pipeline).serving
        args.serving_base = args.serving_base or serving.base
        args.model_name = args.model_name or serving.model_name
        options = ServingOptions(**{k: getattr(serving, k) for k in ServingOptions.model_fields})
    if not (args.serving_base and args.model_name):
        raise ValueError("give --serving-base and --model-name (or --pipeline)")
    live = {k: getattr(args, k) for k in ("grpc_address", "rest_url", "wait_available_s")}
    options = options.model_copy(update={k: v for k, v in live.items() if v})
    if args.promote:
        return push_and_promote(args.saved_model, args.serving_base, args.model_name,
                                args.run_id, options, out_dir=args.out)
    return push(args.saved_model, args.serving_base, args.model_name, args.run_id,
                out_dir=args.out, options=options)


def cmd_summary(args: argparse.Namespace) -> dict:
    from odapi_operators.core.runs import latest_run, summarize_run

    run_dir = args.run_dir or latest_run(args.runs)
    summary = summarize_run(run_dir)
    if args.text:
        for key, value in summary.items():
            print(f"{key:>14}: {value}", file=sys.stderr)
    return summary


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="odapi", description=__doc__.splitlines()[0])
    parser.add_argument("--summary-file", help="also write the JSON summary to this file")
    sub = parser.add_subparsers(dest="command", required=True, metavar="STAGE")

    def stage(name: str, func: Callable, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(func=func)
        return p

    p = stage("sample", cmd_sample, "write the synthetic shapes dataset as a Pascal VOC export")
    p.add_argument("--out", required=True)
    p.add_argument("--count", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-side", type=int, default=160)

    p = stage("ingest", cmd_ingest, "parse annotation exports into a canonical manifest")
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="export folders or files (companion files are just more inputs)")
    p.add_argument("--out", required=True)
    p.add_argument("--format", default="auto", choices=("auto", "voc", "cvat", "coco",
                   "labelstudio", "prodigy", "openimages", "csv"))
    p.add_argument("--images-root", help="resolve image names here (never outside it)")
    p.add_argument("--label-map", help="existing label_map.pbtxt whose ids are kept")
    p.add_argument("--unknown-classes", default="add", choices=("add", "skip", "reject"),
                   help="classes not in --label-map: add them, skip their boxes, or reject "
                        "the image (default: %(default)s)")
    p.add_argument("--classes", type=lambda t: [c for c in t.split(",") if c],
                   help="train only these classes (comma-separated names or MIDs)")
    p.add_argument("--csv-columns", type=lambda t: _pairs(t, str),
                   help="CSV layout: image=COL,label=COL,xmin=COL,ymin=COL,xmax=COL,ymax=COL"
                        "[,width=COL,height=COL]")
    p.add_argument("--csv-normalized", action="store_true",
                   help="CSV coordinates are 0..1 instead of pixels")
    p.add_argument("--datasets", help="publish the result as a dataset version here")

    def download_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--threads", type=int, help="requests in flight (default: 64 per core)")
        p.add_argument("--retries", type=int, default=3)
        p.add_argument("--connect-timeout", type=float, default=10.0)
        p.add_argument("--read-timeout", type=float, default=20.0)
        p.add_argument("--deadline", type=float, default=90.0,
                       help="seconds for one whole response (default: %(default)s)")
        p.add_argument("--max-mb", type=int, default=50, help="largest image body in MiB")

    def common(p: argparse.ArgumentParser, budget: float) -> None:
        p.add_argument("--max-failed-share", type=float, default=budget,
                       help="fail the stage above this share of failed images "
                            "(default: %(default)s)")
        p.add_argument("--no-progress", action="store_true")

    for name in ("download", "fetch"):
        p = stage(name, cmd_fetch, "download/copy images into a resumable image store"
                  + (" (same as download)" if name == "fetch" else ""))
        source = p.add_mutually_exclusive_group(required=True)
        source.add_argument("--manifest")
        source.add_argument("--index", help="an Open Images image index CSV (ImageID, "
                                            "OriginalURL[, OriginalMD5, Rotation])")
        p.add_argument("--out", required=True,
                       help="with --index, images are stored here as <ImageID>.<ext>")
        download_options(p)
        common(p, 0.05)

    p = stage("verify", cmd_verify, "fully decode every image; normalize; quarantine bad ones")
    p.add_argument("--manifest", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--max-side", type=int, help="shrink larger images to this longest side")
    p.add_argument("--workers", type=int, help="decoding processes (default: one per core)")
    common(p, 1.0)

    p = stage("label-map", cmd_label_map, "write label_map.pbtxt (append-only ids)")
    p.add_argument("--manifest", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--previous", help="existing label_map.pbtxt whose ids are kept")

    def shard_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--split", type=lambda t: _pairs(t, float),
                       default={"train": 0.8, "val": 0.2})
        p.add_argument("--shards", type=lambda t: _pairs(t, int),
                       help="shards per split, e.g. train=32,val=4 (default: by --target-shard-mb)")
        p.add_argument("--target-shard-mb", type=int, default=128)
        p.add_argument("--cache", help="reuse shards of the same content written under here")

    p = stage("shard", cmd_shard, "write sharded TFRecords per split")
    p.add_argument("--manifest", required=True)
    p.add_argument("--label-map", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--workers", type=int, help="writer processes (default: one per core)")
    shard_options(p)

    p = stage("prepare", cmd_prepare, "download, verify, label map and shard in one go")
    p.add_argument("--manifest", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--previous-label-map", help="existing label_map.pbtxt whose ids are kept")
    p.add_argument("--max-side", type=int)
    p.add_argument("--workers", type=int)
    download_options(p)
    shard_options(p)
    common(p, 0.05)

    p = stage("train", cmd_train, "train a TF-Vision detector (resumes from the model dir)")
    p.add_argument("--config", help="model config YAML (include/configs/models)")
    p.add_argument("--data", required=True, help="records folder written by `odapi shard`")
    p.add_argument("--model-dir", help="checkpoints, TensorBoard events, params.yaml")
    p.add_argument("--steps", type=int)
    p.add_argument("--batch-size", type=int, help="global batch size (default: 8)")
    start = p.add_mutually_exclusive_group()
    start.add_argument("--init-checkpoint",
                       help="start from this checkpoint (prefix or folder, local or gs://): "
                            "one of ours, or a TF-Vision backbone/zoo checkpoint")
    start.add_argument("--warm-start-from", metavar="SERVING_DIR",
                       help="start from the production model: <serving base>/<model name>")
    p.add_argument("--pipeline", help="a run's frozen pipeline config: fills the options above")
    p.add_argument("--run-id", help="with --pipeline: the run whose train folder to use")

    p = stage("evaluate", cmd_evaluate,
              "COCO metrics (overall and per class) of a model on the val split")
    p.add_argument("--model", required=True,
                   help="model dir written by train (newest checkpoint), or a SavedModel, "
                        "export or TF Serving version folder")
    p.add_argument("--data", required=True, help="records folder written by `odapi shard`")
    p.add_argument("--out", required=True,
                   help="metrics.json to write (detections.json, ground_truth.json beside it)")
    p.add_argument("--min-images", type=int, default=1,
                   help="fail if the val split has fewer images (default: %(default)s)")
    p.add_argument("--missing-classes", choices=("fail", "warn"), default="fail",
                   help="a class without val boxes: fail (default) or warn (its AP is -1)")

    p = stage("gate", cmd_gate, "decide promotion; always writes decision.json")
    p.add_argument("--metrics", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--min-ap50", type=float)

    p = stage("export", cmd_export, "export a checked SavedModel")
    p.add_argument("--model-dir", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--input-type", default="image_tensor",
                   choices=("image_tensor", "image_bytes", "tf_example"))
    p.add_argument("--model-name", default="model", help="model name in the warmup requests")
    p.add_argument("--extra", action="append", default=[],
                   help="file to ship in assets.extra/ (config, metrics, decision); repeatable")

    p = stage("push", cmd_push, "push a SavedModel as the next TF Serving version")
    p.add_argument("--saved-model", required=True)
    p.add_argument("--serving-base")
    p.add_argument("--model-name")
    p.add_argument("--run-id", required=True, help="a re-run with the same id returns the "
                                                   "version it already pushed")
    p.add_argument("--pipeline", help="a run's frozen pipeline config: serving base, model "
                                      "name and options")
    p.add_argument("--promote", action="store_true", help="then move `stable` to the version")
    p.add_argument("--out", help="also write the summary into this folder")
    cli_models.live_serving(p)

    p = stage("summary", cmd_summary, "summarize a pipeline run (default: the newest)")
    p.add_argument("--runs", default="var/runs", help="runs folder (default: %(default)s)")
    p.add_argument("--run-dir", help="one run's folder instead of the newest in --runs")
    p.add_argument("--text", action="store_true", help="also print a readable table on stderr")

    cli_models.add_commands(sub)
    cli_report.add_commands(sub)
    cli_preannotate.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        summary = args.func(args)
    except (ValueError, OSError, RuntimeError) as exc:
        print(f"odapi {args.command}: error: {exc}", file=sys.stderr)
        return 1
    if summary is not None:  # commands that print a table themselves return None
        print(json.dumps(summary, sort_keys=True))
        if args.summary_file:  # e.g. /airflow/xcom/return.json in a KubernetesPodOperator
            from odapi_operators.core import storage

            storage.write_text(args.summary_file, json.dumps(summary, sort_keys=True))
    return 0
