"""`odapi dataset list | show FINGERPRINT | diff A B`: the dataset versions, from a terminal.

The datasets folder is `--datasets`, else the `datasets` of the pipeline config (`--pipeline`,
default $ODAPI_PIPELINE_CONFIG or include/configs/pipeline.yaml), the folder the runs publish
to. A fingerprint may be shortened to a unique prefix. Each command prints a table (or JSON)
itself and returns None, so `cli.main` prints no summary.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

DEFAULT_PIPELINE = "include/configs/pipeline.yaml"
SHOWN_KEYS = 20  # image keys listed per kind by `diff`; --json lists them all


def _datasets(args: argparse.Namespace) -> str:
    """--datasets, else the pipeline config's `datasets`."""
    if args.datasets:
        return args.datasets
    from odapi_operators.core.config import ConfigError, load_pipeline_config

    pipeline = args.pipeline or os.environ.get("ODAPI_PIPELINE_CONFIG") or DEFAULT_PIPELINE
    if not Path(pipeline).is_file():
        raise ConfigError(f"no pipeline config at {pipeline}: give --datasets DIR, or "
                          "--pipeline FILE (or set $ODAPI_PIPELINE_CONFIG)")
    return load_pipeline_config(pipeline).datasets


def _table(rows: list[dict]) -> str:
    from odapi_operators.core.serving.registry import format_table

    return format_table(rows)


def _class_rows(before: dict[str, int], after: dict[str, int]) -> list[dict]:
    return [{"class": name, "before": before.get(name, 0), "after": after.get(name, 0),
             "delta": f"{after.get(name, 0) - before.get(name, 0):+d}"}
            for name in sorted(before.keys() | after.keys())]


def cmd_list(args: argparse.Namespace) -> None:
    from odapi_operators.core.data.datasets import version_rows

    datasets = _datasets(args)
    rows = version_rows(datasets)
    if args.json:
        print(json.dumps(rows, sort_keys=True))
    else:
        print(_table(rows) if rows else f"no dataset versions in {datasets}")


def cmd_show(args: argparse.Namespace) -> None:
    from odapi_operators.core.data.datasets import show_version

    shown = show_version(_datasets(args), args.fingerprint)
    if args.json:
        print(json.dumps(shown, sort_keys=True))
        return
    current = " (current)" if shown["current"] else ""
    print(f"version {shown['fingerprint']}{current}\n"
          f"  parent:   {shown['parent'] or '-'}\n"
          f"  created:  {shown['created'] or '-'} by run {shown['run_id'] or '-'}\n"
          f"  images:   {shown['images']}, boxes: {shown['boxes']}\n"
          f"  changes:  +{shown['added']} added, ~{shown['changed']} changed, "
          f"-{shown['removed']} removed (against the parent)\n"
          f"  newest export landed: {shown['newest_landed_at'] or '-'}\n")
    print("exports absorbed:")
    print(_table([{"landed_at": e["landed_at"], "mode": e["mode"], "path": e["path"]}
                  for e in shown["exports"]]) if shown["exports"] else "none recorded")
    print("\nboxes per class (parent -> this version):")
    print(_table(_class_rows(shown["classes_before"], shown["classes"])))


def cmd_diff(args: argparse.Namespace) -> None:
    from odapi_operators.core.data.datasets import compare_versions

    diff = compare_versions(_datasets(args), args.before, args.after)
    if args.json:
        print(json.dumps(diff, sort_keys=True))
        return
    print(f"{diff['before']} -> {diff['after']}")
    for kind, sign in (("added", "+"), ("changed", "~"), ("removed", "-")):
        keys = diff[kind]
        more = f" ... and {len(keys) - SHOWN_KEYS} more" if len(keys) > SHOWN_KEYS else ""
        listed = f": {' '.join(keys[:SHOWN_KEYS])}{more}" if keys else ""
        print(f"  {sign}{len(keys)} images {kind}{listed}")
    print("\nboxes per class:")
    print(_table(_class_rows(diff["classes_before"], diff["classes_after"])))


def _where(p: argparse.ArgumentParser) -> None:
    p.add_argument("--datasets", help="datasets folder (default: the pipeline config's "
                                      "`datasets`)")
    p.add_argument("--pipeline", help="pipeline config whose `datasets` to read (default: "
                                      f"$ODAPI_PIPELINE_CONFIG or {DEFAULT_PIPELINE})")
    p.add_argument("--json", action="store_true", help="JSON instead of text")


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add `dataset list | show | diff` to the `odapi` parser's subcommands."""
    about = "dataset versions: what each run trained on and how it changed"
    dataset = subparsers.add_parser("dataset", help=about, description=about)
    actions = dataset.add_subparsers(dest="dataset_command", required=True, metavar="ACTION")
    p = actions.add_parser("list", help="every version: parent, created, images, boxes, "
                                        "+added ~changed -removed")
    _where(p)
    p.set_defaults(func=cmd_list)
    p = actions.add_parser("show", help="one version: summary, exports absorbed, classes")
    p.add_argument("fingerprint", help="the version (a unique prefix will do)")
    _where(p)
    p.set_defaults(func=cmd_show)
    p = actions.add_parser("diff", help="images added / changed / removed and boxes per class "
                                        "from version A to version B")
    p.add_argument("before", metavar="A")
    p.add_argument("after", metavar="B")
    _where(p)
    p.set_defaults(func=cmd_diff)
