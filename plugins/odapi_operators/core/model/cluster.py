"""Who this training process is in a multi-worker training, from TensorFlow's `TF_CONFIG`.

Every worker runs the same `odapi train` command; `TF_CONFIG` (`{"cluster": {"worker": [host:
port, ...]}, "task": {"type": "worker", "index": i}}`) says which one it is. Worker 0 (or the
`chief` task, when the cluster names one) is the chief: it alone owns the model dir (its lock,
checkpoints, params and summary); the others train in step with it and write nothing there.

A Kubernetes Indexed Job cannot give each pod its own environment, so its pods get the host
list (`ODAPI_TRAIN_HOSTS`) and Kubernetes' `JOB_COMPLETION_INDEX`, and `TF_CONFIG` is built
from them here. No TensorFlow import: the role is needed before TensorFlow starts.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Mapping, MutableMapping

from odapi_operators.core.failures import Failure

HOSTS_ENV = "ODAPI_TRAIN_HOSTS"  # host:port of every worker, comma-separated, index order
INDEX_ENV = "JOB_COMPLETION_INDEX"  # set by Kubernetes in each pod of an Indexed Job


class ClusterConfigError(ValueError):
    """TF_CONFIG (or the Job's host list) does not describe a cluster this process is in."""
    failure = Failure.CONFIG


@dataclass(frozen=True)
class ClusterRole:
    workers: int  # processes training together (1: no cluster)
    task_type: str = "worker"
    index: int = 0
    has_chief: bool = False  # the cluster names a `chief` task (else worker 0 is the chief)

    @property
    def is_chief(self) -> bool:
        return self.task_type == "chief" or (self.index == 0 and not self.has_chief)

    @property
    def name(self) -> str:
        return f"{self.task_type} {self.index}"


def tf_config(hosts: list[str], index: int) -> str:
    """TF_CONFIG of worker `index` in a cluster of `hosts` (worker 0 is the chief)."""
    return json.dumps({"cluster": {"worker": list(hosts)},
                       "task": {"type": "worker", "index": index}})


def role(environ: Mapping[str, str] = os.environ) -> ClusterRole:
    """This process's role, from TF_CONFIG; without one it trains alone (and is the chief)."""
    raw = environ.get("TF_CONFIG")
    if not raw:
        return ClusterRole(workers=1)
    try:
        config = json.loads(raw)
        cluster, task = config["cluster"], config["task"]
        role = ClusterRole(workers=len(cluster.get("chief", [])) + len(cluster.get("worker", [])),
                           task_type=task["type"], index=int(task["index"]),
                           has_chief=bool(cluster.get("chief")))
    except (ValueError, KeyError, TypeError) as exc:
        raise ClusterConfigError(f"TF_CONFIG: not a cluster spec with a task ({exc}): "
                                 f"{raw[:200]}") from None
    if role.task_type not in ("chief", "worker") or not 0 <= role.index < len(
            cluster.get(role.task_type, [])):
        raise ClusterConfigError(f"TF_CONFIG: task {role.name} is not in the cluster "
                                 f"{cluster}; multi-worker training runs chief/worker tasks")
    return role


def configure_from_job(environ: MutableMapping[str, str] = os.environ) -> None:
    """In a pod of an Indexed Job: set TF_CONFIG from the host list and the pod's index."""
    hosts = environ.get(HOSTS_ENV)
    if not hosts or environ.get("TF_CONFIG"):
        return
    if INDEX_ENV not in environ:
        raise ClusterConfigError(f"{HOSTS_ENV} is set but {INDEX_ENV} is not: a multi-worker "
                                 "training pod must belong to an Indexed Job")
    environ["TF_CONFIG"] = tf_config(hosts.split(","), int(environ[INDEX_ENV]))
