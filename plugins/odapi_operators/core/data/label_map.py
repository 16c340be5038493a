"""label_map.pbtxt in the TF Object Detection API format, with append-only class ids.

    item { id: 1 name: "circle" display_name: "circle" }

Ids start at 1 (0 is background). An existing class keeps its id forever; a new class gets
the next free id, so a model trained last month still means the same thing by class 3.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from google.protobuf import text_encoding

from odapi_operators.core import storage
from odapi_operators.core.data.manifest import read_manifest
from odapi_operators.core.failures import Failure
from odapi_operators.core.layout import SUMMARY

_QUOTED = r"'(?:[^'\\]|\\.)*'" + "|" + r'"(?:[^"\\]|\\.)*"'
_ITEM = re.compile(rf"""item\s*\{{(?P<body>(?:{_QUOTED}|[^}}'"])*)\}}""", re.S)
_FIELD = re.compile(rf"(?P<key>\w+)\s*:\s*(?P<value>{_QUOTED}|-?\d+)")


def _unquote(value: str) -> str:
    if value[:1] in "'\"":
        return text_encoding.CUnescape(value[1:-1]).decode("utf-8")
    return value


def _quote(text: str) -> str:
    return '"' + text_encoding.CEscape(text, as_utf8=True) + '"'


class LabelMapError(ValueError):
    failure = Failure.DATA


def parse_label_map(text: str, source: str = "label_map.pbtxt") -> dict[str, int]:
    """Parse pbtxt text into {name: id}; refuses duplicate names/ids and ids < 1."""
    names: dict[str, int] = {}
    for match in _ITEM.finditer(text):
        fields = {m["key"]: _unquote(m["value"]) for m in _FIELD.finditer(match["body"])}
        if "id" not in fields or "name" not in fields:
            raise LabelMapError(f"{source}: item without id or name: {match.group(0)!r}")
        name, item_id = fields["name"], int(fields["id"])
        if item_id < 1:
            raise LabelMapError(f"{source}: id {item_id} for {name!r}: ids start at 1")
        if name in names or item_id in names.values():
            raise LabelMapError(f"{source}: duplicate name or id in item {name!r}: {item_id}")
        names[name] = item_id
    return names


def format_label_map(label_map: dict[str, int]) -> str:
    items = sorted(label_map.items(), key=lambda kv: kv[1])
    return "".join(
        f"item {{\n  id: {item_id}\n  name: {_quote(name)}\n  display_name: {_quote(name)}\n}}\n"
        for name, item_id in items)


def read_label_map(path: str | Path) -> dict[str, int]:
    return parse_label_map(storage.read_text(path), str(path))


def assert_no_renumbering(before: dict[str, int], after: dict[str, int], source: str) -> None:
    """Refuse a label map that gives an existing class another id or drops it."""
    changed = {name: (item_id, after.get(name)) for name, item_id in before.items()
               if after.get(name) != item_id}
    if changed:
        detail = ", ".join(f"{name}: {old} -> {new}" for name, (old, new) in sorted(changed.items()))
        raise LabelMapError(f"{source}: would renumber or drop classes ({detail}); class ids are "
                            "append-only so existing models keep their meaning")


def extend_label_map(existing: dict[str, int], classes: list[str]) -> dict[str, int]:
    """Append unseen classes (sorted) after the highest existing id; never renumber."""
    result = dict(existing)
    next_id = max(result.values(), default=0) + 1
    for name in sorted(set(classes) - set(result)):
        result[name] = next_id
        next_id += 1
    return result


def build_label_map(manifest: str | Path, out_dir: str | Path,
                    previous: str | Path | None = None) -> dict:
    """Write `label_map.pbtxt` for the classes in `manifest`, extending `previous` if given."""
    classes = sorted({box.label for record in read_manifest(manifest) for box in record.boxes})
    if not classes:
        raise LabelMapError(f"{manifest}: no classes in any box")
    existing = read_label_map(previous) if previous and storage.exists(previous) else {}
    label_map = extend_label_map(existing, classes)
    path = Path(out_dir) / "label_map.pbtxt"
    if storage.exists(path):  # a re-run must not contradict what it wrote before
        assert_no_renumbering(read_label_map(path), label_map, str(path))
    storage.write_text(path, format_label_map(label_map))
    summary = {"label_map": str(path), "classes": label_map,
               "new_classes": sorted(set(label_map) - set(existing))}
    storage.write_text(Path(out_dir) / SUMMARY, json.dumps(summary, indent=2))
    return summary
