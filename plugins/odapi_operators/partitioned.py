"""The images-as-partitions tasks of a DAG, wired in one place (odapi_retrain and the tests).

    plan_partitions -> prepare_partition[i] -> join_partitions -> label_map
                    -> shard_partition[i] -> finish_partitions

Two mapped phases, because the label map (ids for the classes of every verified image) is
needed by every shard and known only once every partition is verified. A failed or lost
mapped task instance retries alone; the others keep what they wrote.
"""

from __future__ import annotations

from typing import Any

from odapi_operators.operators import (
    BuildLabelMapOperator,
    FinishPartitionsOperator,
    JoinPartitionsOperator,
    PlanPartitionsOperator,
    PreparePartitionOperator,
    ShardPartitionOperator,
)


def partitioned_records(config: Any, manifest: Any, **common: Any
                        ) -> tuple[BuildLabelMapOperator, FinishPartitionsOperator]:
    """Tasks from a dataset version's `manifest` to its records; returns the label map task
    and the finishing one (whose `data` is the records folder). `common`: task arguments for
    every task (pool, queue, ...)."""
    plan = PlanPartitionsOperator(task_id="plan_partitions", config=config, manifest=manifest,
                                  **common)
    prepared = PreparePartitionOperator.partial(
        task_id="prepare_partition", config=config, **common).expand(partition=plan.output)
    joined = JoinPartitionsOperator(task_id="join_partitions", config=config,
                                    partitions=plan.output, **common)
    prepared >> joined
    label_map = BuildLabelMapOperator(task_id="label_map", config=config,
                                      manifest=joined.output["manifest"], **common)
    shards = ShardPartitionOperator.partial(
        task_id="shard_partition", config=config, label_map=label_map.output["label_map"],
        **common).expand(partition=plan.output)
    records = FinishPartitionsOperator(task_id="finish_partitions", config=config,
                                       manifest=joined.output["manifest"],
                                       label_map=label_map.output["label_map"],
                                       partitions=plan.output, **common)
    shards >> records
    return label_map, records
