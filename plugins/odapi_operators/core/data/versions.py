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

Memory does not grow with the dataset: the parent's manifest and every export's records are
streams in image-key order (`manifest.records_by_key`), joined key by key (`by_key`); each key's
fate depends only on its own records, except for the names a deleted file lists, which are
resolved first on the few records they can name.
"""

from __future__ import annotations

import heapq
import json
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from fnmatch import fnmatchcase
from pathlib import Path
from typing import get_args

from odapi_operators.core import storage
from odapi_operators.core.config import ExportMode
from odapi_operators.core.data.manifest import ImageRecord, key_from_id, key_from_path, key_from_url
from odapi_operators.core.external_sort import Spool
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
    records: Iterable[ImageRecord]  # in key order, each key once; iterable more than once
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


def _in_key_order(records: Iterable[ImageRecord], tag: int, name: str
                  ) -> Iterator[tuple[str, int, ImageRecord]]:
    previous = None
    for record in records:
        if previous is not None and record.key <= previous:
            raise StageError(f"{name}: image key {record.key!r} after {previous!r}: records "
                             "must be in image-key order, each key once")
        previous = record.key
        yield record.key, tag, record


def by_key(*streams: Iterable[ImageRecord], names: Iterable[str] = ()
           ) -> Iterator[tuple[str, list[ImageRecord | None]]]:
    """Streams in image-key order joined by key: each key once, with every stream's record of
    it (None where a stream lacks it). `names` name the streams in the error for one out of
    order."""
    names = list(names)
    tagged = [_in_key_order(stream, i, names[i] if i < len(names) else f"stream {i}")
              for i, stream in enumerate(streams)]
    current, row = None, None
    for key, tag, record in heapq.merge(*tagged):  # (key, tag) is unique: records never compare
        if key != current:
            if row is not None:
                yield current, row
            current, row = key, [None] * len(streams)
        row[tag] = record
    if row is not None:
        yield current, row


class Diff:
    """Images added, changed (`same_content` is false) and removed from one version to the
    next, and boxes per class on each side; fed key by key, in key order (`add`). The key
    lists are spooled to disk when long."""

    LISTS = ("added", "changed", "removed")

    def __init__(self) -> None:
        self.keys: dict[str, Spool[str]] = {name: Spool() for name in self.LISTS}
        self.classes_before: Counter[str] = Counter()
        self.classes_after: Counter[str] = Counter()

    def add(self, before: ImageRecord | None, after: ImageRecord | None) -> None:
        if before is not None:
            self.classes_before.update(box.label for box in before.boxes)
        if after is not None:
            self.classes_after.update(box.label for box in after.boxes)
        if after is None:
            if before is not None:
                self.keys["removed"].append(before.key)
        elif before is None:
            self.keys["added"].append(after.key)
        elif not same_content(before, after):
            self.keys["changed"].append(after.key)

    def counts(self) -> dict[str, int]:
        return {name: len(keys) for name, keys in self.keys.items()}

    def _classes(self) -> dict[str, dict[str, int]]:
        return {"classes_before": dict(sorted(self.classes_before.items())),
                "classes_after": dict(sorted(self.classes_after.items()))}

    def as_dict(self) -> dict:
        return {**{name: list(keys) for name, keys in self.keys.items()}, **self._classes()}

    def write(self, path: str | Path, head: dict) -> None:
        """`head` and the diff as diff.json: the bytes of `json.dumps(..., indent=2)`,
        streamed, so the key lists are never whole in memory."""
        with storage.atomic_write(path, "w") as fh:
            fh.write("{")
            items = [*head.items(), *((name, keys) for name, keys in self.keys.items()),
                     *self._classes().items()]
            for number, (name, value) in enumerate(items):
                fh.write(f"{',' if number else ''}\n  {json.dumps(name)}: ")
                if isinstance(value, Spool) and len(value):
                    fh.write("[")
                    for index, key in enumerate(value):
                        fh.write(f"{',' if index else ''}\n    {json.dumps(key)}")
                    fh.write("\n  ]")
                else:
                    fh.write(json.dumps(list(value) if isinstance(value, Spool) else value,
                                        indent=2).replace("\n", "\n  "))
            fh.write("\n}" if items else "}")


def diff(before: Iterable[ImageRecord], after: Iterable[ImageRecord]) -> dict:
    """Images added, changed and removed from `before` to `after` (each in key order), and
    boxes per class on each side (`Diff`)."""
    changes = Diff()
    for _, (old, new) in by_key(before, after, names=("before", "after")):
        changes.add(old, new)
    return changes.as_dict()


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


def _step(record: ImageRecord | None, incoming: ImageRecord | None, delta: ExportDelta,
          deleted: bool, superseded: set[str]) -> ImageRecord | None:
    """One key's record after `delta` (None: not in the dataset): removed if `deleted` or
    absent from a snapshot, relabelled by `incoming`, unless its labels are newer."""
    if record is not None and (deleted or (delta.mode == "snapshot" and incoming is None)):
        if _newer(record, delta):
            superseded.add(record.key)
        else:
            record = None
    if incoming is None:
        return record
    if record is not None and _newer(record, delta):
        superseded.add(record.key)
        return record
    if record is not None and same_content(record, incoming) and _still_there(record):
        return _stamped(record, delta)  # confirmed by a later export
    return _stamped(incoming, delta)


def _deleted_keys(start: Iterable[ImageRecord], deltas: list[ExportDelta], base: str,
                  replay: bool) -> tuple[list[set[str]], tuple[int, StageError] | None]:
    """The keys each export's deleted file removes, and the first export whose deleted file
    cannot apply (its index and error), if any. Only records a listed name can name (by key,
    source id, URI or a key a parser could make of it) matter, so only they are kept and
    played through the exports as `_resolve_deleted` expects."""
    names = {name for delta in deltas for _, name in delta.deleted}
    wanted = names.union(*map(_candidate_keys, names))
    kept: list[list[ImageRecord]] = [[] for _ in range(len(deltas) + 1)]
    for key, row in by_key(start, *(d.records for d in deltas)):
        if key in wanted or any(r is not None and (r.source_id in names or r.source.uri in names)
                                for r in row):
            for records, record in zip(kept, row):
                if record is not None:
                    records.append(record)
    state = {r.key: r for r in kept[0]}
    removals: list[set[str]] = []
    for number, (delta, records) in enumerate(zip(deltas, kept[1:])):
        incoming = {r.key: r for r in records}
        try:
            keys = _resolve_deleted(delta, state, incoming, base, replay) if delta.deleted \
                else set()
        except StageError as exc:
            return removals, (number, exc)
        removals.append(keys)
        for key in state.keys() | incoming.keys():
            record = _step(state.get(key), incoming.get(key), delta, key in keys, set())
            if record is None:
                state.pop(key, None)
            else:
                state[key] = record
    return removals, None


class Applied:
    """The exports applied to the parent, key by key: iterate `changes()` once, in key order,
    for (parent's record, record after every export) per key; `superseded` (the keys whose
    later labels kept a change out) is complete after that. A data error found on the way is
    raised at the end of `changes()`, after the last pair."""

    def __init__(self, parent: Iterable[ImageRecord], parent_name: str,
                 deltas: list[ExportDelta], removals: list[set[str]], base_name: str,
                 rebuild: bool, failure: StageError | None):
        self.parent, self.parent_name, self.deltas = parent, parent_name, deltas
        self.removals, self.base_name, self.rebuild = removals, base_name, rebuild
        self.failure = failure
        self.superseded_keys: set[str] = set()

    @property
    def superseded(self) -> list[str]:
        return sorted(self.superseded_keys)

    def changes(self) -> Iterator[tuple[ImageRecord | None, ImageRecord | None]]:
        deltas, removals = self.deltas, self.removals
        sizes = [0] * (len(deltas) + 1)  # images before the first export, after each one
        streams = by_key(self.parent, *(d.records for d in deltas),
                         names=[self.parent_name, *(d.path for d in deltas)])
        for key, (before, *incoming) in streams:
            record = None if self.rebuild else before
            sizes[0] += record is not None
            for number, (delta, new) in enumerate(zip(deltas, incoming)):
                record = _step(record, new, delta, key in removals[number],
                               self.superseded_keys)
                sizes[number + 1] += record is not None
            yield before, record
        for number, delta in enumerate(deltas):
            if sizes[number] and not sizes[number + 1]:
                raise StageError(
                    f"export {delta.path} ({delta.mode}) removes every image: the "
                    f"{sizes[number]} images of {self.base_name} would leave and none would be "
                    "added, so the dataset would be empty; check the export (a snapshot of an "
                    "empty or wrong project?); nothing was published")
        if self.failure is not None:
            raise self.failure


def apply_exports(parent: Iterable[ImageRecord], deltas: list[ExportDelta], *,
                  base_name: str, newest_landed_at: str | None = None, rebuild: bool = False,
                  parent_name: str = "the parent version") -> Applied:
    """`parent` (in key order, iterable more than once) with every export of `deltas` applied
    in landing order (see the module doc); the result streams from `Applied.changes()`.

    `base_name` names the base in messages ("version 3f2a..."); `newest_landed_at` is the
    newest landing time the base absorbed (None: no snapshot is too old). A data error naming
    the export, for a snapshot older than that, a deleted file naming unknown images, or an
    export that empties the dataset, ends `changes()`. `rebuild` (`run.take_exports: all`):
    start from no records (`parent` is then only what `changes()` compares with) and replay
    every export, each checked when it was first consumed: a deleted name of an image no
    replayed export holds (it came from an export since gone) removes nothing.
    """
    deltas = sorted(deltas, key=lambda d: d.landed_at)
    failure: tuple[int, StageError] | None = None
    for number, delta in enumerate(deltas):
        if delta.mode == "snapshot" and newest_landed_at and delta.landed_at < newest_landed_at:
            failure = (number, StageError(
                f"export {delta.path} is a snapshot that landed at {delta.landed_at}, before "
                f"the newest export {base_name} absorbed ({newest_landed_at}): taking it "
                "would bring back the labelling project as it was then. Export the project "
                f"again, or treat this export as incremental "
                f"({setting('exports.modes', {delta.path: 'incremental'})}); nothing was "
                "published"))
            break
    deltas = deltas[:failure[0]] if failure else deltas
    removals: list[set[str]] = [set() for _ in deltas]
    if any(delta.deleted for delta in deltas):
        removals, refused = _deleted_keys([] if rebuild else parent, deltas, base_name,
                                          replay=rebuild)
        if refused:
            failure, deltas = refused, deltas[:refused[0]]
    return Applied(parent, parent_name, deltas, removals, base_name, rebuild,
                   failure[1] if failure else None)


def _still_there(record: ImageRecord) -> bool:
    """An unchanged image keeps its earlier source unless that file is gone."""
    return record.source.kind != "local" or Path(record.source.uri).is_file()
