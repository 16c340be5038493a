"""Where the train task runs, from the pipeline config's `train.placement` (read at parse time).

- `local`: `TrainDetectorOperator`, a child process of whichever worker takes the task;
- `celery`: the same operator on the Celery queue `queue` (a worker started with `-q gpu`);
- `kubernetes`: a `KubernetesPodOperator` running the same `odapi stage run train ...`
  command in the project image, requesting `gpus` x `nvidia.com/gpu`; its JSON summary comes
  back through the pod's XCom sidecar. With `workers: N` > 1, N such pods train together
  (`training_job.py`: an Indexed Job, a headless Service, TF_CONFIG per pod).

Every placement takes a slot of `pool` (default `gpu`, one slot: one training at a time).
"""

from __future__ import annotations

from typing import Any

from airflow.sdk import BaseOperator

from odapi_operators.core.config import KubernetesPlacement, TrainPlacement
from odapi_operators.core.stages.runner import stage_command
from odapi_operators.operators import TrainDetectorOperator

XCOM_RETURN = "/airflow/xcom/return.json"  # the KubernetesPodOperator's XCom sidecar reads it


def train_task(task_id: str, *, config: Any, data: Any, placement: TrainPlacement,
               **kwargs: Any) -> BaseOperator:
    """The train task for `placement`; `config`/`data` are the upstream XComArgs."""
    if placement.pool:
        kwargs["pool"] = placement.pool
    if placement.where == "kubernetes":
        return train_pod(task_id, config=config, data=data, spec=placement.kubernetes, **kwargs)
    if placement.where == "celery":
        kwargs["queue"] = placement.queue
    return TrainDetectorOperator(task_id=task_id, config=config, data=data, **kwargs)


def train_pod(task_id: str, *, config: Any, data: Any, spec: KubernetesPlacement,
              **kwargs: Any) -> BaseOperator:
    """A KubernetesPodOperator running `odapi train` for this run on `spec.gpus` GPUs; with
    `spec.workers` > 1, an Indexed Job of that many such pods training together."""
    if spec.workers > 1:
        from odapi_operators.training_job import MultiWorkerTrainJobOperator

        return MultiWorkerTrainJobOperator(task_id=task_id, workers=spec.workers,
                                           **_pod_arguments(config, data, spec), **kwargs)
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator

    return KubernetesPodOperator(task_id=task_id, name="odapi-train",
                                 **_pod_arguments(config, data, spec), **kwargs)


def _pod_arguments(config: Any, data: Any, spec: KubernetesPlacement) -> dict[str, Any]:
    """What every training pod is: image, command, GPUs, volume, env, XCom sidecar."""
    from kubernetes.client import models as k8s

    resources = None
    tolerations = []
    if spec.gpus:
        gpus = {"nvidia.com/gpu": str(spec.gpus)}
        resources = k8s.V1ResourceRequirements(limits=gpus, requests=gpus)
        tolerations = [k8s.V1Toleration(key="nvidia.com/gpu", operator="Exists",
                                        effect="NoSchedule")]
    volumes, mounts = [], []
    if spec.volume_claim:
        volumes = [k8s.V1Volume(name="odapi-var", persistent_volume_claim=(
            k8s.V1PersistentVolumeClaimVolumeSource(claim_name=spec.volume_claim)))]
        mounts = [k8s.V1VolumeMount(name="odapi-var", mount_path=spec.mount_path)]
    return dict(
        namespace=spec.namespace, image=spec.image, cmds=["odapi"],
        arguments=stage_command("train", pipeline=config, run_id="{{ run_id }}",
                                inputs={"data": data}, result_file=XCOM_RETURN),
        container_resources=resources, tolerations=tolerations, volumes=volumes,
        volume_mounts=mounts, node_selector=spec.node_selector or None,
        service_account_name=spec.service_account,
        env_vars={"TF_USE_LEGACY_KERAS": "1", "PYTHONUNBUFFERED": "1"},
        startup_timeout_seconds=spec.startup_timeout_seconds, get_logs=True,
        do_xcom_push=True, multiple_outputs=True, on_finish_action="delete_pod")
