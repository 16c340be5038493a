"""`odapi`: every pipeline stage on the command line, printing one JSON summary on stdout.

The stage commands (`odapi ingest`, `odapi train`, ...) and `odapi stage run` are generated
from the stage declarations (`stage_cli.py`); the Airflow operators run `odapi stage run` in
a child process or a pod: the same code path a person debugging at a terminal takes.
Exit status: 0 on success, 2 on usage, 6 when the stage had nothing to do, and otherwise the
failure kind (`core/failures.py`): 1 transient, 3 config, 4 data, 5 refused.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback

from odapi_operators import cli_datasets, cli_labelstudio, cli_models, stage_cli
from odapi_operators.core.failures import EXIT_CODES, EXIT_SKIPPED, StageSkipped, failure_of
from odapi_operators.core.wording import config_words, flag_words, speaking


def cmd_sample(args: argparse.Namespace) -> dict:
    from odapi_operators.core.data.sample_data import Look, generate

    look = Look(classes=tuple(args.classes.split(",")), sizes=tuple(args.sizes),
                palette=args.palette)
    return generate(args.out, count=args.count, seed=args.seed, max_side=args.max_side,
                    prefix=args.prefix, look=look)


def cmd_prepare(args: argparse.Namespace) -> dict:
    """Download, verify, label map and shard in one call (the data stages' own options)."""
    from odapi_operators.core.config import ImagesConfig, RecordsConfig
    from odapi_operators.core.data.prepare import prepare

    images = ImagesConfig.model_validate({**stage_cli.given(args, "images__"),
                                          "cache": args.image_cache})
    records = RecordsConfig.model_validate(stage_cli.without_home_paths(
        "records", RecordsConfig.model_fields, stage_cli.given(args, "records__")))
    return prepare(args.manifest, args.out, ratios=records.split, shards=records.shards,
                   target_shard_bytes=records.target_shard_mb << 20, max_side=images.max_side,
                   threads=images.threads, workers=images.workers,
                   max_failed_share=images.max_failed_share,
                   max_quarantined_share=images.max_quarantined_share, policy=images.policy(),
                   previous_label_map=args.previous_label_map, cache_dir=records.cache,
                   image_cache_dir=images.cache,
                   **({} if args.no_progress else stage_cli.progress_output()))


def cmd_summary(args: argparse.Namespace) -> dict:
    from odapi_operators.core.runs import latest_run, summarize_run

    run_dir = args.run_dir or latest_run(args.runs)
    summary = summarize_run(run_dir)
    if args.text:
        for key, value in summary.items():
            print(f"{key:>14}: {value}", file=sys.stderr)
    return summary


def build_parser() -> argparse.ArgumentParser:
    from odapi_operators.core.config import ImagesConfig, RecordsConfig

    parser = argparse.ArgumentParser(prog="odapi", description=__doc__.splitlines()[0])
    parser.add_argument("--summary-file", help="also write the JSON summary to this file")
    sub = parser.add_subparsers(dest="command", required=True, metavar="STAGE")
    stage_cli.add_stage_commands(sub)
    stage_cli.add_generic_command(sub)

    about = "write the synthetic shapes dataset as a Pascal VOC export"
    p = sub.add_parser("sample", help=about, description=about)
    p.add_argument("--out", required=True)
    p.add_argument("--count", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-side", type=int, default=160)
    p.add_argument("--prefix", default="shapes", help="image names <prefix>_<n>.jpg; another "
                   "export of other images needs another prefix (same name = same image)")
    p.add_argument("--classes", default="circle,square,triangle",
                   help="comma-separated shapes to draw (circle, square, triangle, diamond)")
    p.add_argument("--sizes", type=float, nargs=2, default=(0.25, 0.5), metavar=("MIN", "MAX"),
                   help="object side as a share of the image's shorter side")
    p.add_argument("--palette", default="any", choices=("any", "dark", "light"),
                   help="object colours")
    p.set_defaults(func=cmd_sample)

    about = "download, verify, label map and shard in one go"
    p = sub.add_parser("prepare", help=about, description=about)
    p.add_argument("--manifest", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--previous-label-map", help="existing label_map.pbtxt whose ids are kept")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--image-cache", help="images fetched and verified by earlier runs, reused "
                   "by source and content (a pipeline's images.cache)")
    stage_cli.add_fields(p.add_argument_group("images"),  # --cache is the records cache
                         {k: v for k, v in ImagesConfig.model_fields.items() if k != "cache"},
                         "images__")
    stage_cli.add_fields(p.add_argument_group("records"),  # --workers serves both
                         {k: v for k, v in RecordsConfig.model_fields.items() if k != "workers"},
                         "records__")
    p.set_defaults(func=cmd_prepare)

    about = "summarize a pipeline run (default: the newest)"
    p = sub.add_parser("summary", help=about, description=about)
    p.add_argument("--runs", default="var/runs", help="runs folder (default: %(default)s)")
    p.add_argument("--run-dir", help="one run's folder instead of the newest in --runs")
    p.add_argument("--text", action="store_true", help="also print a readable table on stderr")
    p.set_defaults(func=cmd_summary)

    cli_models.add_commands(sub)
    cli_datasets.add_commands(sub)
    cli_labelstudio.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Messages name settings as the user gave them: flags, except `odapi stage run`, which
    # replays a pipeline config for an operator or a pod (config keys).
    words = config_words if args.command == "stage" else flag_words
    try:
        with speaking(words):
            summary = args.func(args)
    except StageSkipped as exc:
        print(f"odapi {args.command}: nothing to do: {exc}", file=sys.stderr)
        return EXIT_SKIPPED
    except Exception as exc:  # noqa: BLE001 - every failure leaves as an exit status
        known = isinstance(exc, (ValueError, OSError, RuntimeError)) or hasattr(exc, "failure")
        if not known:
            traceback.print_exc()
        print(f"odapi {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_CODES[failure_of(exc)]
    if summary is not None:  # commands that print a table themselves return None
        print(json.dumps(summary, sort_keys=True))
        if args.summary_file:  # e.g. /airflow/xcom/return.json in a KubernetesPodOperator
            from odapi_operators.core import storage

            storage.write_text(args.summary_file, json.dumps(summary, sort_keys=True))
    return 0
