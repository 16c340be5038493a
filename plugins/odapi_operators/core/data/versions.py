"""Dataset versions that accumulate: a version is its parent plus the exports a run consumes.

Records are keyed by image key. Exports apply in landing order, each in its mode:

- `incremental`: the export adds the images it holds and relabels those it holds again
  (latest labels win); it removes only the images its deleted file lists;
- `snapshot`: the export is the whole labelling project; images absent from it leave.

An export never overrides labels that a later-landed export gave (a backfilled export merges
under newer labels, it does not roll them back): each record carries the export and landing
time its labels came from in its provenance. A snapshot older than the newest export its base
absorbed is refused for the same reason, as are a deleted list naming images the dataset does
not hold (a typo would silently keep an image) and an export that would leave nothing.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from fnmatch import fnmatchcase
from pathlib import Path
from typing import get_args

from odapi_operators.core import storage
from odapi_operators.core.config import ExportMode
from odapi_operators.core.data.manifest import ImageRecord, key_from_id, key_from_path, key_from_url
from odapi_operators.core.rejections import StageError
from odapi_operators.core.wording import setting

MODES = get_args(ExportMode)
SHOWN = 5  # problems named in one message; the rest are counted


def iso(epoch: float) -> str:
    """A landing time as fixed-width ISO text (UTC, microseconds): it sorts as it compares."""
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="microseconds")


def export_mode(path: str, default: str, overrides: dict[str, str] | None) -> str:
    """The mode of the export at `path`: the first `overrides` glob it matches, else `default`."""
    return next((mode for glob, mode in (overrides or {}).items() if fnmatchcase(path, glob)),
                default)


@dataclass(frozen=True)
class ExportDelta:
    """What one export does to the dataset: its records (merged, aliased, class policy
    applied) and the names its deleted file lists, as (line number, name)."""

    path: str
    fingerprint: str
    landed_at: str  # `iso`
    mode: str
    records: list[ImageRecord]
    deleted: list[tuple[int, str]] = field(default_factory=list)
    deleted_file: str | None = None

    def describe(self) -> dict:
        """The export as diff.json and versions.jsonl list it."""
        return {"path": self.path, "fingerprint": self.fingerprint,
                "landed_at": self.landed_at, "mode": self.mode}


def read_deleted(path: str | Path) -> list[tuple[int, str]]:
    """The names a deleted file lists, with their line numbers; blank lines and lines starting
    with # are skipped."""
    lines = enumerate(storage.read_text(path).splitlines(), 1)
    return [(number, line.strip()) for number, line in lines
            if line.strip() and not line.lstrip().startswith("#")]


def same_content(a: ImageRecord, b: ImageRecord) -> bool:
    """Same image, same labels: boxes, size, rotation and checksum (not where the bytes are:
    a snapshot re-delivers every image from a new folder, and that changes nothing)."""
    return (a.boxes, a.width, a.height, a.rotation, a.md5) == (b.boxes, b.width, b.height,
                                                               b.rotation, b.md5)


def class_counts(records: Iterable[ImageRecord]) -> dict[str, int]:
    counts = Counter(box.label for record in records for box in record.boxes)
    return dict(sorted(counts.items()))


def diff(before: Iterable[ImageRecord], after: Iterable[ImageRecord]) -> dict:
    """Images added, changed (`same_content` is false) and removed from `before` to `after`,
    and boxes per class on each side."""
    old = {r.key: r for r in before}
    new = {r.key: r for r in after}
    return {"added": sorted(new.keys() - old.keys()),
            "changed": sorted(k for k in new.keys() & old.keys()
                              if not same_content(new[k], old[k])),
            "removed": sorted(old.keys() - new.keys()),
            "classes_before": class_counts(old.values()),
            "classes_after": class_counts(new.values())}


def _stamped(record: ImageRecord, delta: ExportDelta) -> ImageRecord:
    """`record` noting the export that last gave its labels, and when that export landed."""
    return replace(record, provenance={**record.provenance, "export": delta.path,
                                       "landed_at": delta.landed_at})


def _newer(record: ImageRecord, delta: ExportDelta) -> bool:
    """The record's labels came from an export that landed after `delta`."""
    return str(record.provenance.get("landed_at", "")) > delta.landed_at


def _names(record: ImageRecord) -> set[str]:
    return {record.key, record.source_id, record.source.uri}


def _candidate_keys(name: str) -> set[str]:
    """Keys a parser could have made of `name` (a relative path, a URL or a source id)."""
    keys = {key_from_path(name), key_from_id(name)}
    if "://" in name:
        keys.add(key_from_url(name))
    return keys


def _resolve_deleted(delta: ExportDelta, state: dict[str, ImageRecord],
                     incoming: dict[str, ImageRecord], base: str, replay: bool) -> set[str]:
    """The keys `delta`'s deleted file names; every name must name exactly one image the
    dataset holds (when replayed, a name of no image removes nothing), and none the export
    itself labels."""
    index: dict[str, set[str]] = defaultdict(set)
    for record in (*state.values(), *incoming.values()):
        for name in _names(record):
            index[name].add(record.key)
    keys, problems = set(), []
    for number, name in delta.deleted:
        found = ({name} if name in state or name in incoming else index.get(name)) or {
            k for k in _candidate_keys(name) if k in state or k in incoming}
        where = f"{delta.deleted_file} line {number}: {name!r}"
        if not found and replay:
            continue
        if not found:
            problems.append(f"{where} names no image of {base} or of this export")
        elif len(found) > 1:
            problems.append(f"{where} names {len(found)} images ({', '.join(sorted(found))}); "
                            "list their keys instead")
        elif found & incoming.keys():
            problems.append(f"{where} is labelled in this export too")
        else:
            keys |= found
    if problems:
        more = f" (and {len(problems) - SHOWN} more)" if len(problems) > SHOWN else ""
        raise StageError(f"export {delta.path}: its deleted file cannot be applied: "
                         f"{'; '.join(problems[:SHOWN])}{more}. List each image once, by its "
                         f"key or as the export names it ({setting('exports.deleted_file')}); "
                         "nothing was published")
    return keys


@dataclass
class Applied:
    """The records after every export, and the changes later labels kept out."""

    records: list[ImageRecord]
    superseded: list[str]


def apply_exports(base: Iterable[ImageRecord], deltas: list[ExportDelta], *, base_name: str,
                  newest_landed_at: str | None = None, replay: bool = False) -> Applied:
    """`base` with every export of `deltas` applied in landing order (see the module doc).

    `base_name` names the base in messages ("version 3f2a..."); `newest_landed_at` is the
    newest landing time the base absorbed (None: no snapshot is too old). Raises a data
    StageError, naming the export, for a snapshot older than that, a deleted file naming
    unknown images, or an export that empties the dataset. `replay` (a rebuild from every
    export, each checked when it was first consumed): a deleted name of an image no replayed
    export holds (it came from an export since gone) removes nothing.
    """
    state = {r.key: r for r in base}
    superseded: list[str] = []
    for delta in sorted(deltas, key=lambda d: d.landed_at):
        if delta.mode == "snapshot" and newest_landed_at and delta.landed_at < newest_landed_at:
            raise StageError(
                f"export {delta.path} is a snapshot that landed at {delta.landed_at}, before "
                f"the newest export {base_name} absorbed ({newest_landed_at}): taking it "
                "would bring back the labelling project as it was then. Export the project "
                f"again, or treat this export as incremental "
                f"({setting('exports.modes', {delta.path: 'incremental'})}); nothing was "
                "published")
        incoming = {r.key: r for r in delta.records}
        removals = (_resolve_deleted(delta, state, incoming, base_name, replay)
                    if delta.deleted else set())
        if delta.mode == "snapshot":
            removals |= state.keys() - incoming.keys()
        before = len(state)
        for key in sorted(removals):
            if _newer(state[key], delta):
                superseded.append(key)
            else:
                del state[key]
        for key, record in incoming.items():
            old = state.get(key)
            if old is not None and _newer(old, delta):
                superseded.append(key)
            elif old is not None and same_content(old, record) and _still_there(old):
                state[key] = _stamped(old, delta)  # confirmed by a later export
            else:
                state[key] = _stamped(record, delta)
        if before and not state:
            raise StageError(f"export {delta.path} ({delta.mode}) removes every image: the "
                             f"{before} images of {base_name} would leave and none would be "
                             "added, so the dataset would be empty; check the export (a "
                             "snapshot of an empty or wrong project?); nothing was published")
    return Applied([state[key] for key in sorted(state)], sorted(set(superseded)))


def _still_there(record: ImageRecord) -> bool:
    """An unchanged image keeps its earlier source unless that file is gone."""
    return record.source.kind != "local" or Path(record.source.uri).is_file()
