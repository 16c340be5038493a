"""`odapi labelstudio push-tasks | pull-export | labeling-config`: Label Studio from a terminal.

The server and token come from an Airflow connection (`--conn-id`, e.g. labelstudio_default),
else from `--url` / $LABEL_STUDIO_URL and $LABEL_STUDIO_API_KEY (never a flag: a token on the
command line is visible to every user of the machine).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING

from odapi_operators.core.failures import Failure

if TYPE_CHECKING:
    from odapi_operators.core.labeling.labelstudio_client import LabelStudioClient


def _client(args: argparse.Namespace) -> LabelStudioClient:
    """--conn-id's connection, else --url / $LABEL_STUDIO_URL with $LABEL_STUDIO_API_KEY."""
    from odapi_operators.core.labeling.labelstudio_client import (
        API_KEY_ENV,
        URL_ENV,
        Address,
        LabelStudioClient,
        LabelStudioError,
    )

    if args.conn_id:
        from odapi_operators.hooks import LabelStudioHook

        return LabelStudioHook(args.conn_id).get_conn()
    url, api_key = args.url or os.environ.get(URL_ENV), os.environ.get(API_KEY_ENV)
    if not (url and api_key):
        missing = " and ".join(([] if url else [f"--url (or ${URL_ENV})"]) +
                               ([] if api_key else [f"${API_KEY_ENV}"]))
        raise LabelStudioError(f"no Label Studio address: give {missing}, or --conn-id",
                               Failure.CONFIG)
    return LabelStudioClient(Address(url.rstrip("/"), api_key))


def cmd_push_tasks(args: argparse.Namespace) -> dict:
    from odapi_operators.core.labeling.labelstudio_client import LabelStudioError, push_tasks

    if args.project is None and not (args.create and args.label_map):
        raise LabelStudioError("give --project ID, or --create TITLE with --label-map FILE",
                               Failure.CONFIG)
    return push_tasks(_client(args), args.tasks, project=args.project, title=args.create,
                      label_map=args.label_map)


def cmd_pull_export(args: argparse.Namespace) -> dict:
    from odapi_operators.core.labeling.labelstudio_client import pull_export

    return pull_export(_client(args), args.project, args.out, args.export_type,
                       args.marker or None)


def cmd_labeling_config(args: argparse.Namespace) -> None:
    from odapi_operators.core.data.label_map import read_label_map
    from odapi_operators.core.labeling.labelstudio_client import labeling_config

    sys.stdout.write(labeling_config(read_label_map(args.label_map)))


def _server(p: argparse.ArgumentParser) -> None:
    p.add_argument("--conn-id", help="Airflow connection with the URL and token (e.g. "
                                     "labelstudio_default)")
    p.add_argument("--url", help="Label Studio URL (default: $LABEL_STUDIO_URL; the token is "
                                 "$LABEL_STUDIO_API_KEY)")


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add `labelstudio push-tasks | pull-export | labeling-config` to the `odapi` parser."""
    from odapi_operators.core.labeling.labelstudio_client import EXPORT_TYPES

    about = "Label Studio in the loop: push pre-annotated tasks, pull exports"
    parser = subparsers.add_parser("labelstudio", help=about, description=about)
    actions = parser.add_subparsers(dest="labelstudio_command", required=True, metavar="ACTION")

    p = actions.add_parser("push-tasks", help="import tasks (with predictions) into a project")
    p.add_argument("tasks", help="tasks.json, or a preannotate --format labelstudio folder")
    p.add_argument("--project", type=int, help="the project's id")
    p.add_argument("--create", metavar="TITLE", help="create a project with this title instead")
    p.add_argument("--label-map", help="label_map.pbtxt whose classes --create's project labels")
    _server(p)
    p.set_defaults(func=cmd_push_tasks)

    p = actions.add_parser("pull-export", help="export a project into an export folder "
                                               "(atomically, marker last) for ingest")
    p.add_argument("--project", type=int, required=True, help="the project's id")
    p.add_argument("--out", required=True, help="the export folder to write")
    p.add_argument("--export-type", choices=EXPORT_TYPES, default="JSON",
                   help="Label Studio export type (default: %(default)s)")
    p.add_argument("--marker", default="_SUCCESS",
                   help="written last (default: %(default)s; '' for none)")
    _server(p)
    p.set_defaults(func=cmd_pull_export)

    p = actions.add_parser("labeling-config", help="print a RectangleLabels labeling config "
                                                   "for a label map")
    p.add_argument("--label-map", required=True, help="label_map.pbtxt")
    p.set_defaults(func=cmd_labeling_config)
