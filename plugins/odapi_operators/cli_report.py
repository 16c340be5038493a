"""`odapi report`: a run's HTML report (metrics vs production, gate decision, loss, boxes).

Hooked into `odapi` by `cli.add_commands(subparsers)`; like the stage commands it returns its
summary for `cli.main` to print as JSON.
"""

from __future__ import annotations

import argparse


def cmd_report(args: argparse.Namespace) -> dict:
    from odapi_operators.core.evaluation.report import build_report

    return build_report(args.out, args.eval, args.data, model_dir=args.model_dir,
                        baseline_eval_dir=args.baseline_eval, decision=args.decision,
                        grid_images=args.grid_images, score_threshold=args.score_threshold,
                        title=args.title)


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add `report` to the `odapi` parser's subcommands."""
    about = "write a run's HTML report with its PNGs (the folder is replaced whole)"
    p = subparsers.add_parser("report", help=about, description=about)
    p.add_argument("--eval", required=True,
                   help="candidate eval folder (metrics.json, detections.json, ground_truth.json)")
    p.add_argument("--data", required=True, help="records folder written by `odapi shard`")
    p.add_argument("--out", required=True, help="report folder to write")
    p.add_argument("--model-dir", help="training model dir (loss curve from its train/ events)")
    p.add_argument("--baseline-eval", help="production model's eval folder, same split")
    p.add_argument("--decision", help="decision.json written by `odapi gate`")
    p.add_argument("--grid-images", type=int, default=12,
                   help="validation images to draw (default: %(default)s)")
    p.add_argument("--score-threshold", type=float, default=0.3,
                   help="lowest score of a drawn prediction (default: %(default)s)")
    p.add_argument("--title")
    p.set_defaults(func=cmd_report)
