"""One policy for boxes drawn around a group of objects, whichever format marks them.

COCO marks them `iscrowd`, Open Images `IsGroupOf`. Such a box does not outline one object,
so by default (`exports.group_boxes: skip`) it is left out and reported as a choice, and an
image left with only group boxes is dropped (kept, it would teach the model its objects are
background). `keep` takes them as ordinary boxes; they are counted in the ingest summary, so
neither choice is silent.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from odapi_operators.core.wording import setting

if TYPE_CHECKING:
    from odapi_operators.core.data.formats import ParseContext

POLICIES = ("skip", "keep")
REASON = "group box"  # a rejection reason's head: a choice, not a defect (ingest.CHOICES)
KEPT = "group boxes kept"  # ParseContext.notes counter
SKIPPED = "group boxes skipped"


def keeps(ctx: ParseContext) -> bool:
    """True if group boxes are kept as ordinary boxes; ValueError for an unknown policy."""
    policy = ctx.options.get("group_boxes") or "skip"
    if policy not in POLICIES:
        raise ValueError(f"{setting('exports.group_boxes')} must be one of "
                         f"{', '.join(POLICIES)}, got {policy!r}")
    return policy == "keep"


def counted(ctx: ParseContext, kept: bool, boxes: int = 1) -> None:
    """Count group boxes kept or skipped, for the ingest summary."""
    ctx.notes[KEPT if kept else SKIPPED] += boxes


def skipped_reason(detail: str) -> str:
    """The reason for skipped group boxes, naming the setting that would keep them."""
    return f"{REASON}: {detail} skipped ({setting('exports.group_boxes', 'keep')} keeps them)"


def dropped_reason(count: int, detail: str) -> str:
    """The reason for an image whose boxes were all skipped group boxes."""
    return f"{REASON}: image dropped, all {count} boxes are group boxes ({detail})"
