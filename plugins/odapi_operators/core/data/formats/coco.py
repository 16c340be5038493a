"""COCO object-detection JSON (`instances_*.json`).

`bbox` is `[x, y, width, height]` in pixels of the image's `width` x `height`. Images resolve
from `file_name` relative to the JSON's folder (or the images root); an http(s) or gs://
`file_name` is a remote image. Crowd regions (`iscrowd`) are group boxes: skipped or kept as
`exports.group_boxes` says, always reported (`group_boxes.py`). Images without annotations are kept:
they are the negatives; an image whose annotations were all refused is dropped (keeping it
would teach the model that its objects are background).

The image-location helpers here (`locate_image`, `local_key`) are shared by the other JSON
formats so one image gets one key whichever export names it.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from odapi_operators.core.data.boxes import normalized_box
from odapi_operators.core.data.formats import group_boxes
from odapi_operators.core.data.formats.common import (
    brief,
    image_size,
    is_number,
    json_root_char,
    kept,
    no_usable_box,
    read_json_document,
)
from odapi_operators.core.data.manifest import Box, ImageRecord
from odapi_operators.core.rejections import RecordError

if TYPE_CHECKING:
    from odapi_operators.core.data.formats import ParseContext

NAME = "coco"
SUFFIXES = (".json",)

_HEAD_BYTES = 4096  # how much of a file ingest shows a sniffer (ingest.SNIFF_BYTES)


_FIRST_KEY = re.compile(rb'^\{\s*"(info|licenses|categories|images|annotations)"\s*:')


def sniff(path: Path, head: bytes) -> bool:
    """A JSON object naming `images`, and `annotations` too unless the head is cut short; or,
    cut short, one that opens with a COCO key and names `categories`.

    A real COCO file may list 100k images before its `annotations` key, far past the head;
    CVAT and datumaro write `categories` before `images`, and with ~85 classes or more the
    `images` key is past the head too. Label Studio exports are JSON arrays, so the two
    sniffers never claim the same file.
    """
    if json_root_char(head) != b"{":
        return False
    cut_short = len(head) >= _HEAD_BYTES
    if b'"images"' in head:
        return b'"annotations"' in head or cut_short
    opening = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    return cut_short and b'"categories"' in head and _FIRST_KEY.match(opening) is not None


def is_id(value: Any) -> bool:
    """COCO ids are integers (some tools write strings); anything else cannot be looked up."""
    return isinstance(value, (int, str)) and not isinstance(value, bool)


def _categories(doc: dict, file: str, ctx: ParseContext) -> dict[Any, str]:
    names: dict[Any, str] = {}
    for index, category in enumerate(doc.get("categories") or []):
        record = f"categories[{index}]"
        if not isinstance(category, dict) or not is_id(category.get("id")):
            ctx.log.add(RecordError(file, record, "bad category: no id").rejection)
        elif not isinstance(category.get("name"), str):
            ctx.log.add(RecordError(file, record, "bad category: no name").rejection)
        elif category["id"] in names:
            ctx.log.add(RecordError(file, record,
                                    f"duplicate category id: {brief(category['id'])}").rejection)
        else:
            names[category["id"]] = category["name"]
    return names


def _box(annotation: dict, label: str, image: dict, image_id: Any) -> Box:
    """Pixel `[x, y, w, h]` -> checked normalized box; raises ValueError with the reason."""
    bbox = annotation.get("bbox")
    if not isinstance(bbox, list) or len(bbox) != 4 or not all(is_number(v) for v in bbox):
        raise ValueError(f"bad bbox: expected [x, y, width, height] numbers, got {brief(bbox)}")
    size = image_size(image.get("width"), image.get("height"))
    if size is None:
        raise ValueError(f"missing image size: image {brief(image_id)} has no width/height "
                         f"to place a pixel box")
    x, y, w, h = bbox
    return normalized_box(label, x, y, x + w, y + h, *size)


def _label(annotation: Any, image_id: Any, images: dict, labels: dict) -> str:
    """The class name of a usable annotation; raises ValueError with the reason."""
    if not isinstance(annotation, dict):
        raise ValueError("bad annotation: not a JSON object")
    if not is_id(image_id) or image_id not in images:
        raise ValueError(f"unknown image_id: {brief(image_id)}")
    category = annotation.get("category_id")
    if not is_id(category) or category not in labels:
        raise ValueError(f"unknown category_id: {brief(category)}")
    return labels[category]


def parse_coco_file(json_path: Path, ctx: ParseContext) -> Iterator[ImageRecord]:
    file = str(json_path)
    doc = read_json_document(json_path)
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list):
        raise RecordError(file, "document", "not a COCO export: no images list")
    folder = Path(json_path).parent
    labels = _categories(doc, file, ctx)

    images: dict[Any, tuple[int, dict]] = {}   # image id -> (index, entry), first one wins
    for index, image in enumerate(doc["images"]):
        record = f"images[{index}]"
        if not isinstance(image, dict) or not is_id(image.get("id")):
            ctx.log.add(RecordError(file, record, "bad image entry: no id").rejection)
        elif image["id"] in images:
            first = images[image["id"]][0]
            ctx.log.add(RecordError(file, record, f"duplicate image id: {brief(image['id'])} "
                                    f"already given by images[{first}]").rejection)
        else:
            images[image["id"]] = (index, image)

    boxes: dict[Any, list[Box]] = {image_id: [] for image_id in images}
    refused: Counter[Any] = Counter()  # image id -> its annotations that were refused
    grouped: Counter[Any] = Counter()  # image id -> its group boxes that were skipped
    keep_groups = group_boxes.keeps(ctx)
    annotations = doc.get("annotations") or []
    if not isinstance(annotations, list):
        raise RecordError(file, "document", "not a COCO export: annotations is not a list")
    for index, annotation in enumerate(annotations):
        image_id = annotation.get("image_id") if isinstance(annotation, dict) else None
        try:
            label = _label(annotation, image_id, images, labels)
            box = _box(annotation, label, images[image_id][1], image_id)
            if annotation.get("iscrowd"):
                group_boxes.counted(ctx, keep_groups)
                if not keep_groups:
                    grouped[image_id] += 1
                    ctx.log.add(RecordError(file, f"annotations[{index}]", _crowd(annotation))
                                .rejection)
                    continue
            boxes[image_id].append(box)
        except ValueError as exc:
            ctx.log.add(RecordError(file, f"annotations[{index}]", str(exc)).rejection)
            if is_id(image_id) and image_id in images:
                refused[image_id] += 1

    for image_id, (index, image) in images.items():
        record = kept(ctx.log, lambda: _image_record(image_id, index, image, boxes[image_id],
                                                     refused[image_id], grouped[image_id],
                                                     folder, file, ctx))
        if record is not None:
            yield record


def _crowd(annotation: dict) -> str:
    return group_boxes.skipped_reason(f"iscrowd={brief(annotation['iscrowd'])} region "
                                      f"(annotation id {brief(annotation.get('id'))})")


def _image_record(image_id: Any, index: int, image: dict, boxes: list[Box], refused: int,
                  grouped: int, folder: Path, file: str, ctx: ParseContext) -> ImageRecord:
    """The record of one image entry; raises RecordError if it cannot be used."""
    record = f"images[{index}]"
    if refused and not boxes:  # keeping it would teach the model its objects are background
        raise no_usable_box(file, record, refused + grouped, "annotations")
    if grouped and not boxes:
        raise RecordError(file, record, group_boxes.dropped_reason(grouped, "iscrowd"))
    try:
        size = image_size(image.get("width"), image.get("height"))
    except ValueError as exc:
        raise RecordError(file, record, str(exc)) from None
    key, source = ctx.locate(image.get("file_name"), folder, file, record)
    return ImageRecord(
        key=key,
        source=source,
        source_id=str(image_id),
        width=size[0] if size else None,
        height=size[1] if size else None,
        boxes=tuple(boxes),
        provenance={"format": NAME, "file": file, "element": record, "image_id": image_id},
    )


def parse(files: list[Path], ctx: ParseContext) -> Iterator[ImageRecord]:
    """Parse the COCO files of one export; a bad file is logged and skipped."""
    from odapi_operators.core.data.formats import parse_each

    return parse_each(files, ctx, parse_coco_file)