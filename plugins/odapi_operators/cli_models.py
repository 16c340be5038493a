"""`odapi models list`: the model registry and Serving's labels, from a terminal.

Works on the serving base alone (no pipeline config needed at 3 a.m.): models.config and the
registry default to `<serving-base>/models.config` and `<serving-base>/registry.jsonl`. It
prints a table (or JSON) itself and returns None, so `cli.main` prints no summary.
"""

from __future__ import annotations

import argparse
import json
import os

DEFAULT_BASE = os.environ.get("ODAPI_SERVING_BASE", "var/serving")


def _options(args: argparse.Namespace):
    from odapi_operators.core.serving.models_config import ServingOptions

    return ServingOptions(models_config=args.models_config, registry=args.registry)


def cmd_models_list(args: argparse.Namespace) -> None:
    from odapi_operators.core.serving import models_config as serving_config
    from odapi_operators.core.serving import registry

    options = _options(args)
    records = registry.read(options.registry_path(args.serving_base), args.model)
    config = serving_config.read(options.models_config_path(args.serving_base))
    labels = {m.name: dict(m.version_labels) for m in config.model_config_list.config
              if args.model in (None, m.name)}
    if args.json:
        shown = {id(r) for r in registry.candidates(records)}
        kept = [r for r in records if r.get("kind") != "candidate" or id(r) in shown]
        print(json.dumps({"labels": labels, "records": kept}, sort_keys=True))
    else:
        print(registry.format_table(registry.rows(records, labels)))


def _locations(p: argparse.ArgumentParser) -> None:
    p.add_argument("--serving-base", default=DEFAULT_BASE,
                   help="TF Serving base folder or gs:// prefix (default: $ODAPI_SERVING_BASE "
                        "or %(default)s)")
    p.add_argument("--models-config", help="default: <serving-base>/models.config")
    p.add_argument("--registry", help="default: <serving-base>/registry.jsonl")


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add `models list` to the `odapi` parser's subcommands."""
    about = "the model registry: every candidate and label move"
    models = subparsers.add_parser("models", help=about, description=about)
    actions = models.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    p = actions.add_parser("list", help="candidates and label moves, as a table or JSON")
    p.add_argument("--model", help="only this model")
    p.add_argument("--json", action="store_true", help="JSON instead of a table")
    _locations(p)
    p.set_defaults(func=cmd_models_list)
