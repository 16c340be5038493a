"""A run of the partitioned data stages in one process, one task after the other: what a
single worker does with the mapped tasks (tests compare what several workers write with it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from odapi_operators.core.stages.runner import run_stage


def stage(pipeline: Path, name: str, **inputs: Any) -> Any:
    """Stage `name` of run r1 from a pipeline YAML, in this process; its result."""
    return run_stage(name, pipeline=pipeline, run_id="r1", inputs=inputs, log=lambda _: None)


def run_partitioned(pipeline: Path, export: Path, reverse: bool = False) -> Path:
    """Every stage from ingest to records, partition tasks one after the other (in reverse
    order, if asked); the run folder."""
    manifest = stage(pipeline, "ingest", exports=[str(export)]).manifest
    parts = [p.model_dump() for p in stage(pipeline, "plan_partitions",
                                           manifest=manifest).partitions]
    order = parts[::-1] if reverse else parts
    for part in order:
        stage(pipeline, "prepare_partition", partition=part)
    joined = stage(pipeline, "join_partitions", partitions=parts).manifest
    label_map = stage(pipeline, "label_map", manifest=joined).label_map
    for part in order:
        stage(pipeline, "shard_partition", partition=part, label_map=label_map)
    stage(pipeline, "finish_partitions", partitions=parts, manifest=joined,
          label_map=label_map)
    return pipeline.parent / "var" / "runs" / "r1"


def shards(records: Path) -> dict[str, bytes]:
    """Shard file name -> bytes."""
    return {p.name: p.read_bytes() for p in sorted(records.glob("*.tfrecord"))}
