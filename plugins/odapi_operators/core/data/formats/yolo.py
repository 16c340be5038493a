"""YOLO labels (Ultralytics, Darknet, labelImg, Roboflow): one `.txt` per image.

A label line is `class cx cy w h`, normalized 0..1 (centre, width, height); `class` indexes
the class names. A line of `class x1 y1 x2 y2 ... xn yn` (3+ points: a segment or an
oriented box) becomes the box around its points, as Ultralytics does when it trains a
detector on segment labels. A 6-value line is a prediction (`yolo predict save_conf=True`
appends a confidence), not ground truth: it is rejected, like every other bad line, as
`line N` of its file.

Class names come from the nearest of these, in the label's folder or above it (never above
the export): `data.yaml` (or any YAML with `names:`, a list or an {id: name} mapping; `nc`
must agree), `classes.txt` (labelImg), `obj.names` / `*.names` (Darknet, CVAT "YOLO 1.1"),
`_darknet.labels` (Roboflow "YOLO Darknet").

Layouts. Ultralytics / Roboflow: `<split>/images/a.jpg` with `<split>/labels/a.txt`
(`train`, `valid`, `test`, data.yaml at the root); the image of a label file is found by
swapping the last `labels` folder for `images`. Darknet / labelImg / CVAT: the image sits
next to its `.txt`. The split paths inside data.yaml (`train: ../train/images`, `path:`) are
not followed: an export is what its folder holds. With an images root, the image is looked up there: under the label's
relative folder (`labels` swapped for `images`, then as is), then in the root itself.

Negatives. An empty label file is an image without objects. An image in an Ultralytics
`images/` folder with no label file at all is one too: Ultralytics counts it as "missing"
and trains on it as background, and so do we (its provenance says `background: no label
file`). A label file without an image is rejected. Image lists (Darknet `train.txt`) and
Roboflow's `README*.txt` are not label files and are passed over.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import yaml

from odapi_operators.core.data.boxes import checked_box
from odapi_operators.core.data.formats.common import brief, no_usable_box, parses_as_float
from odapi_operators.core.data.manifest import Box, ImageRecord, ImageSource
from odapi_operators.core.rejections import RecordError

if TYPE_CHECKING:
    from odapi_operators.core.data.formats import ParseContext

NAME = "yolo"
SUFFIXES = (".txt", ".yaml", ".yml", ".names", ".labels")
NAMES_FILES = ("classes.txt", "_darknet.labels")  # besides *.names and YAML with names:
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")
NAMES_HINT = "data.yaml (names:), classes.txt, obj.names or _darknet.labels"
_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_LABEL_LINE = re.compile(rf"\s*\d+(?:\.0*)?(?:\s+{_NUMBER}){{4,}}\s*")
_YAML_NAMES = re.compile(rb"(?m)^names\s*:")


def _is_names_file(path: Path) -> bool:
    return path.name.lower() in NAMES_FILES or path.suffix.lower() == ".names"


def _is_yaml(path: Path) -> bool:
    return path.suffix.lower() in (".yaml", ".yml")


def _passed_over(path: Path) -> bool:
    """Roboflow's README.dataset.txt / README.roboflow.txt sit among the labels."""
    return path.name.lower().startswith("readme")


def sniff(path: Path, head: bytes) -> bool:
    """Names files by name (YAML by its `names:` key); a `.txt` in a `labels` folder, or
    whose first line is a label line; an empty one next to a names file. A label file with
    bad lines is still claimed, so its lines are reported, not the file passed over."""
    if _is_yaml(path):
        return bool(_YAML_NAMES.search(head))
    if _is_names_file(path):
        return True
    if path.suffix.lower() != ".txt" or _passed_over(path):
        return False
    if path.parent.name == "labels":
        return True
    first = next((line for line in head.decode("utf-8", errors="replace").splitlines()
                  if line.strip()), None)
    if first is None:
        return any((path.parent / name).is_file() for name in _Names.STANDARD)
    return bool(_LABEL_LINE.fullmatch(first))


# -- class names --------------------------------------------------------------------------

def _yaml_names(path: Path) -> list[str] | None:
    """The `names:` of a YOLO dataset YAML; None if it has none; ValueError if unusable."""
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8-sig"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ValueError(f"not valid YAML: {brief(str(exc))}") from None
    if not isinstance(doc, dict) or "names" not in doc:
        return None
    raw = doc["names"]
    if isinstance(raw, dict):
        try:
            ids = sorted(int(k) for k in raw)
        except (TypeError, ValueError):
            raise ValueError(f"bad names: keys must be class ids 0, 1, ..., got "
                             f"{brief(list(raw))}") from None
        if ids != list(range(len(ids))):
            raise ValueError(f"bad names: ids must run 0..{len(ids) - 1} without gaps, got "
                             f"{brief(ids)}")
        raw = [raw[k] if k in raw else raw[str(k)] for k in ids]
    if not isinstance(raw, list) or not all(isinstance(n, (str, int)) for n in raw):
        raise ValueError(f"bad names: expected a list or an id -> name mapping, got {brief(raw)}")
    names = [str(n).strip() for n in raw]
    nc = doc.get("nc")
    if nc is not None and nc != len(names):
        raise ValueError(f"names and nc disagree: nc is {brief(nc)} but {len(names)} names")
    return names


def _text_names(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"not UTF-8 text: byte {exc.start} ({exc.reason})") from None
    lines = text.splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    return [line.strip() for line in lines]


def _check_names(names: list[str]) -> list[str]:
    empty = [i for i, name in enumerate(names) if not name]
    if empty:
        raise ValueError(f"empty class name: class id {empty[0]}")
    return names


class _Names:
    """Names sources by folder: the export's claimed ones, and the standard file names looked
    up on disk (a label file given alone still finds the data.yaml above it)."""

    STANDARD = ("data.yaml", "data.yml", "classes.txt", "obj.names", "_darknet.labels")

    def __init__(self, files: list[Path], ctx: ParseContext):
        self.ctx = ctx
        self.root = Path(ctx.export_root).resolve()
        self.found: dict[Path, tuple[list[str], str] | None] = {}
        self.tried: set[Path] = set()
        for path in sorted(files, key=lambda p: not _is_yaml(p)):  # data.yaml outranks others
            names = self._load(path)
            if names is not None:
                self.found.setdefault(path.parent.resolve(), names)

    def _load(self, path: Path) -> tuple[list[str], str] | None:
        """Names of one source, once: a bad source is reported the first time only."""
        if path.resolve() in self.tried:
            return None
        self.tried.add(path.resolve())
        try:
            names = _yaml_names(path) if _is_yaml(path) else _text_names(path)
            if names is None:
                return None  # a YAML that is not a dataset description
            return _check_names(names), str(path)
        except ValueError as exc:
            self.ctx.log.add(RecordError(str(path), "names", str(exc)).rejection)
        except OSError as exc:
            self.ctx.log.add(RecordError(str(path), "file", f"unreadable file: {exc}").rejection)
        return None

    def in_folder(self, folder: Path) -> tuple[list[str], str] | None:
        if folder not in self.found:
            self.found[folder] = next(
                (names for name in self.STANDARD if (folder / name).is_file()
                 and self.root in (folder / name).resolve().parents
                 and (names := self._load(folder / name)) is not None), None)
        return self.found[folder]

    def for_label(self, label: Path) -> tuple[list[str], str] | None:
        """The nearest names source in the label's folder or above, up to the export root."""
        folder = label.parent.resolve()
        while folder == self.root or self.root in folder.parents:
            names = self.in_folder(folder)
            if names is not None:
                return names
            folder = folder.parent
        return None


# -- images -------------------------------------------------------------------------------

class _Images:
    """Image files by folder and stem, listed once per folder."""

    def __init__(self) -> None:
        self.folders: dict[Path, dict[str, Path]] = {}

    def in_folder(self, folder: Path) -> dict[str, Path]:
        if folder not in self.folders:
            found: dict[str, Path] = {}
            try:
                entries = sorted(os.scandir(folder), key=lambda e: e.name)
            except OSError:
                entries = []
            for entry in entries:
                path = Path(entry.path)
                if path.suffix.lower() in IMAGE_SUFFIXES and entry.is_file():
                    found.setdefault(path.stem, path)
            self.folders[folder] = found
        return self.folders[folder]

    def find(self, folder: Path, stem: str) -> Path | None:
        return self.in_folder(folder).get(stem)


def _images_folder(labels_folder: Path) -> Path | None:
    """`x/labels/sub` -> `x/images/sub` (the last `labels` part), None without one."""
    parts = labels_folder.parts
    for index in range(len(parts) - 1, -1, -1):
        if parts[index] == "labels":
            return Path(*parts[:index], "images", *parts[index + 1:])
    return None


def _image_of(label: Path, images: _Images, ctx: ParseContext) -> Path | None:
    if ctx.images_root is not None:
        try:
            relative = label.absolute().parent.relative_to(Path(ctx.export_root).absolute())
        except ValueError:  # a label file given outside the export folder: look in the root
            relative = Path(".")
        swapped = _images_folder(relative)
        candidates = ([swapped] if swapped is not None else []) + [relative, Path(".")]
        for folder in dict.fromkeys(candidates):  # images/x, labels/x, then the root itself
            try:
                target = ctx.resolve_image(str(folder)) if folder != Path(".") \
                    else Path(ctx.images_root).resolve()
            except ValueError:
                continue
            found = images.find(target, label.stem)
            if found is not None:
                return found
        return None
    swapped = _images_folder(label.parent)
    for folder in ([swapped] if swapped is not None else []) + [label.parent]:
        found = images.find(folder, label.stem)
        if found is not None:
            return found
    return None


# -- label files --------------------------------------------------------------------------

def _class_id(raw: str) -> int:
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0 or value != int(value):
        raise ValueError(f"bad class id: {raw!r} is not a class index 0, 1, ...")
    return int(value)


def _line_box(fields: list[str], names: tuple[list[str], str] | None) -> Box:
    """One label line -> checked normalized box; ValueError with the reason."""
    count = len(fields)
    if count == 6:
        raise ValueError("prediction, not a label: 6 values (class cx cy w h confidence, as "
                         "`yolo predict save_conf=True` writes); a label line has 5")
    if count < 5 or (count > 6 and count % 2 == 0):
        raise ValueError(f"wrong value count: {count} values; expected class cx cy w h, or "
                         "class x1 y1 x2 y2 x3 y3 ... for a polygon")
    class_id = _class_id(fields[0])
    try:
        values = [float(v) for v in fields[1:]]
    except ValueError:
        bad = next(v for v in fields[1:] if not parses_as_float(v))
        raise ValueError(f"not a number: {bad!r}") from None
    if names is None:
        raise ValueError(f"no class names: no {NAMES_HINT} in the label's folder or above it")
    label_names, names_file = names
    if class_id >= len(label_names):
        raise ValueError(f"unknown class id: {class_id}, but {names_file} names "
                         f"{len(label_names)} classes (0..{len(label_names) - 1})")
    if count == 5:
        cx, cy, w, h = values
        if not (w > 0 and h > 0):
            raise ValueError(f"degenerate box: width {w:g}, height {h:g}")
        return checked_box(label_names[class_id], cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)
    xs, ys = values[0::2], values[1::2]
    return checked_box(label_names[class_id], min(xs), min(ys), max(xs), max(ys))


def _label_lines(path: Path) -> list[tuple[int, str]]:
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise RecordError(str(path), "file", f"not UTF-8 text: byte {exc.start} "
                                             f"({exc.reason})") from None
    return [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]


def _is_image_list(lines: list[tuple[int, str]]) -> bool:
    """Darknet's train.txt / valid.txt: one image path a line, not labels."""
    first = lines[0][1].strip() if lines else ""
    return bool(first) and not _LABEL_LINE.fullmatch(first) \
        and Path(first).suffix.lower() in IMAGE_SUFFIXES


def _source_id(image: Path, ctx: ParseContext) -> str:
    root = Path(ctx.images_root or ctx.export_root).resolve()
    resolved = image.resolve()
    return resolved.relative_to(root).as_posix() if root in resolved.parents else image.name


def _record(image: Path, boxes: tuple[Box, ...], provenance: dict[str, Any],
            ctx: ParseContext) -> ImageRecord:
    image = image.resolve()
    return ImageRecord(key=ctx.image_key(image, image.parent), source=ImageSource("local",
                                                                                str(image)),
                       source_id=_source_id(image, ctx), width=None, height=None, boxes=boxes,
                       provenance=provenance)


def _label_record(label: Path, lines: list[tuple[int, str]], image: Path,
                  names: tuple[list[str], str] | None, ctx: ParseContext) -> ImageRecord:
    file = str(label)
    boxes = []
    for number, line in lines:
        try:
            boxes.append(_line_box(line.split(), names))
        except ValueError as exc:
            ctx.log.add(RecordError(file, f"line {number}", str(exc)).rejection)
    if lines and not boxes:  # keeping it would teach the model its objects are background
        raise no_usable_box(file, "file", len(lines), "lines")
    provenance: dict[str, Any] = {"format": NAME, "file": file}
    if names is not None:
        provenance["names"] = names[1]
    return _record(image, tuple(boxes), provenance, ctx)


def _backgrounds(images_folders: set[Path], paired: set[Path],
                 ctx: ParseContext) -> Iterator[ImageRecord]:
    """Images of Ultralytics `images/` folders that have no label file: background."""
    for folder in sorted(images_folders):
        for path in sorted(folder.rglob("*")):
            if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file() \
                    and path.resolve() not in paired:
                try:
                    _inside_roots(path, str(path), ctx)
                    _no_label_file(path)
                except RecordError as exc:
                    ctx.log.add(exc.rejection)
                    continue
                yield _record(path, (), {"format": NAME, "file": str(path),
                                         "background": "no label file"}, ctx)


def parse(files: list[Path], ctx: ParseContext) -> Iterator[ImageRecord]:
    """Records of every label file of one export, then its unlabeled `images/` (background)."""
    paths = [Path(p) for p in files]
    name_files = [p for p in paths if _is_yaml(p) or _is_names_file(p)]
    names = _Names(name_files, ctx)
    images = _Images()
    paired: set[Path] = set()
    images_folders: set[Path] = set()
    for label in paths:
        if label in name_files or _passed_over(label):
            continue
        try:
            lines = _label_lines(label)
        except RecordError as exc:
            ctx.log.add(exc.rejection)
            continue
        except OSError as exc:
            ctx.log.add(RecordError(str(label), "file", f"unreadable file: {exc}").rejection)
            continue
        if _is_image_list(lines):
            continue
        image = _image_of(label, images, ctx)
        if image is None:
            ctx.log.add(RecordError(str(label), "file", "missing image: no image named "
                                    f"{label.stem}.* in {_looked_in(label, ctx)}").rejection)
            continue
        paired.add(image.resolve())
        if _images_folder(label.parent) == image.parent:
            images_folders.add(_images_top(image.parent))
        try:
            _inside_roots(image, str(label), ctx)
            yield _label_record(label, lines, image, names.for_label(label), ctx)
        except RecordError as exc:
            ctx.log.add(exc.rejection)
    if ctx.images_root is None:
        yield from _backgrounds(images_folders, paired, ctx)


def _no_label_file(image: Path) -> None:
    """An image whose label file exists but was not read is not background: refuse it."""
    parts = image.parent.parts
    index = len(parts) - 1 - parts[::-1].index("images")
    label = Path(*parts[:index], "labels", *parts[index + 1:], f"{image.stem}.txt")
    if label.exists():
        raise RecordError(str(image), "file", f"labels not read: {label} exists but was not "
                                              "read as YOLO labels (image not used)")


def _inside_roots(image: Path, file: str, ctx: ParseContext) -> None:
    """Refuse an image that is a symlink out of the export (or images root)."""
    root = Path(ctx.images_root or ctx.export_root).resolve()
    if root not in image.resolve().parents:
        raise RecordError(file, "file", f"outside the export: {image} resolves outside {root} "
                                        "(not read)")


def _images_top(folder: Path) -> Path:
    """The `images` folder itself for `x/images/sub` (Ultralytics lists it recursively)."""
    parts = folder.parts
    index = len(parts) - 1 - parts[::-1].index("images")
    return Path(*parts[:index + 1])


def _looked_in(label: Path, ctx: ParseContext) -> str:
    if ctx.images_root is not None:
        return f"the images root {ctx.images_root}"
    swapped = _images_folder(label.parent)
    return f"{swapped} or {label.parent}" if swapped is not None else str(label.parent)
