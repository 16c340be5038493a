"""`odapi rollback` and `odapi models list`: the served model, from a terminal.

Hooked into `odapi` by `cli.add_commands(subparsers)`. Both work on the serving base alone
(no pipeline config needed at 3 a.m.): models.config and the registry default to
`<serving-base>/models.config` and `<serving-base>/registry.jsonl`, and rollback keeps the
version policy models.config already has. Command functions print their own output (a
table is not JSON) and return None: `cli.main` should print a summary only when one is
returned.
"""

from __future__ import annotations

import argparse
import json
import os

DEFAULT_BASE = os.environ.get("ODAPI_SERVING_BASE", "var/serving")


def _options(args: argparse.Namespace, model: str | None = None):
    from odapi_operators.core.serving import models_config as serving_config

    live = {k: getattr(args, k, None) for k in ("grpc_address", "rest_url", "wait_available_s")}
    options = serving_config.ServingOptions(models_config=args.models_config,
                                            registry=args.registry,
                                            **{k: v for k, v in live.items() if v})
    if model is None:
        return options
    config = serving_config.read(options.models_config_path(args.serving_base))
    return serving_config.current_policy(serving_config.entry(config, model), options)


def cmd_rollback(args: argparse.Namespace) -> None:
    from odapi_operators.core.serving.publish import roll_back

    by = args.by or os.environ.get("USER") or os.environ.get("LOGNAME")
    result = roll_back(args.serving_base, args.model, args.to, _options(args, args.model),
                       reason=args.reason, by=by)
    print(json.dumps(result, sort_keys=True))


def cmd_models_list(args: argparse.Namespace) -> None:
    from odapi_operators.core.serving import registry, models_config as serving_config

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


def live_serving(p: argparse.ArgumentParser) -> None:
    """Options naming a running TF Serving that must confirm a label move."""
    p.add_argument("--grpc-address", help="TF Serving gRPC host:port: the label moves only "
                                          "once the version is AVAILABLE and answers")
    p.add_argument("--rest-url", help="TF Serving REST URL (http://host:8501), the same check")
    p.add_argument("--wait-available-s", type=float, help="how long to wait (default: 300)")


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add `rollback` and `models list` to the `odapi` parser's subcommands."""
    about = "move the `stable` label back to an earlier version"
    p = subparsers.add_parser("rollback", help=about, description=about)
    p.add_argument("--model", required=True)
    p.add_argument("--to", type=int, metavar="VERSION",
                   help="default: the previous stable version")
    p.add_argument("--reason", help="why (recorded in the registry)")
    p.add_argument("--by", help="who (default: the current user)")
    _locations(p)
    live_serving(p)
    p.set_defaults(func=cmd_rollback)

    about = "the model registry: every candidate and label move"
    models = subparsers.add_parser("models", help=about, description=about)
    actions = models.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    p = actions.add_parser("list", help="candidates and label moves, as a table or JSON")
    p.add_argument("--model", help="only this model")
    p.add_argument("--json", action="store_true", help="JSON instead of a table")
    _locations(p)
    p.set_defaults(func=cmd_models_list)
