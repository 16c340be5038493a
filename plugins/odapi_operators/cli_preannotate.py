"""`odapi preannotate`: the production model pre-annotates unlabeled images; active learning
picks the next labeling batch (Prodigy or Label Studio tasks).

Hooked into `odapi` by `cli.add_commands(subparsers)`; returns its summary for `cli.main` to
print as JSON. TensorFlow is loaded in this process (it is the child the DAG's operator runs).
"""

from __future__ import annotations

import argparse


def cmd_preannotate(args: argparse.Namespace) -> dict:
    from odapi_operators.core.labeling.preannotate import PreannotateOptions, preannotate
    from odapi_operators.core.labeling.predictors import open_predictor, resolve_model
    from odapi_operators.core.labeling.selection import SelectionPolicy

    options = PreannotateOptions(
        fmt=args.format, top_k=args.top, score_threshold=args.score_threshold,
        max_boxes=args.max_boxes, batch_size=args.batch_size,
        inline_images=not args.no_inline,
        selection=SelectionPolicy(band=(args.band[0], args.band[1]),
                                  max_hamming=args.max_hamming))
    ref = resolve_model(args.model, serving_dir=args.serving_dir, label_map=args.label_map)
    predictor = open_predictor(ref)
    candidate = open_predictor(resolve_model(args.candidate)) if args.candidate else None
    try:
        return preannotate(args.images, args.out, predictor, candidate=candidate,
                           labeled=args.labeled, sent_ledger=args.sent_ledger,
                           cache_dir=args.cache, options=options)
    finally:
        for model in (predictor, candidate):
            if model is not None:
                model.close()


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add `preannotate` to the `odapi` parser's subcommands."""
    about = ("pre-annotate unlabeled images with the production model and write the most "
             "informative ones as Prodigy or Label Studio tasks")
    p = subparsers.add_parser("preannotate", help=about, description=about)
    p.add_argument("--model", required=True, metavar="SERVING_DIR_OR_URL",
                   help="<serving base>/<model> (its production version), a version or "
                        "SavedModel folder; or TF Serving: grpc://host:8500/MODEL, "
                        "http://host:8501/v1/models/MODEL[/versions/N|/labels/L]")
    p.add_argument("--images", required=True, metavar="POOL",
                   help="unlabeled images: a folder, a gs:// prefix, or a text file of "
                        "URLs/paths (one a line)")
    p.add_argument("--out", required=True, help="batch folder to write (replaced whole)")
    p.add_argument("--format", choices=("prodigy", "labelstudio"), default="prodigy")
    p.add_argument("--top", type=int, metavar="K",
                   help="send the K most informative images (default: all)")
    p.add_argument("--score-threshold", type=float, default=0.3,
                   help="lowest score of a proposed box (default: %(default)s)")
    p.add_argument("--max-boxes", type=int, default=20,
                   help="most proposed boxes per image (default: %(default)s)")
    p.add_argument("--candidate", metavar="MODEL",
                   help="a second model (folder, e.g. a training model dir): images where it "
                        "disagrees with production rank higher")
    p.add_argument("--labeled", metavar="MANIFEST_OR_EXPORT", action="append", default=[],
                   help="images labeled already (a manifest, ingest folder or annotation "
                        "export; repeatable): skipped, and counted against the sent ledger")
    p.add_argument("--sent-ledger", metavar="FILE",
                   help="what was sent before, local or gs:// (default: sent-<model>.jsonl "
                        "beside --out)")
    p.add_argument("--serving-dir", help="with a Serving URL: the pushed model folder "
                                         "(<base>/<model>) for version, label map, input type")
    p.add_argument("--label-map", help="label_map.pbtxt (default: the model's assets.extra)")
    p.add_argument("--cache", help="store for downloaded pool images (default: pool-cache "
                                   "beside --out)")
    p.add_argument("--batch-size", type=int, default=8, help="images per model call")
    p.add_argument("--band", type=float, nargs=2, default=(0.2, 0.6), metavar=("LOW", "HIGH"),
                   help="borderline score band for uncertainty (default: 0.2 0.6)")
    p.add_argument("--max-hamming", type=int, default=6,
                   help="dHash bits within which two images are near-duplicates")
    p.add_argument("--no-inline", action="store_true",
                   help="Prodigy: name local images by path instead of inlining them")
    p.set_defaults(func=cmd_preannotate)
