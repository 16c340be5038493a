"""Training on N Kubernetes pods at once: one Indexed Job, one Airflow task.

- The Job is Indexed (N completions, N in parallel): Kubernetes names pod i's host `<job>-<i>`
  and gives it `JOB_COMPLETION_INDEX=i`.
- Every pod's `subdomain` is the headless Service `odapi-train-workers` (created in the
  namespace when missing, then kept: it costs nothing and serves every training Job), so
  `<job>-<i>.odapi-train-workers:2222` reaches pod i. It publishes pods before they are
  ready: the workers dial each other while they start.
- Every pod runs the same `odapi stage run train ...` with the host list in
  `ODAPI_TRAIN_HOSTS`; `core/model/cluster.py` makes TF_CONFIG of it and the index. Pod 0 is
  the chief: its result is the task's XCom.
- `backoff_limit=0`: a pod lost fails the Job (the others stop on a collective error) and the
  task's retry starts a new Job whose pods resume from the chief's newest checkpoint. A pod
  restarted alone could not rejoin the others' collectives.
"""

from __future__ import annotations

from typing import Any

from airflow.providers.cncf.kubernetes.operators.job import KubernetesJobOperator
from kubernetes.client import models as k8s
from kubernetes.client.rest import ApiException

from odapi_operators.core.model.cluster import HOSTS_ENV

SERVICE = "odapi-train-workers"
WORKER_LABEL = {"odapi/train-worker": "true"}  # what the Service selects
PORT = 2222  # TensorFlow's gRPC server in each pod
INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"


def headless_service(namespace: str) -> k8s.V1Service:
    """The Service that gives each training pod a DNS name, ready or not."""
    return k8s.V1Service(
        api_version="v1", kind="Service",
        metadata=k8s.V1ObjectMeta(name=SERVICE, namespace=namespace),
        spec=k8s.V1ServiceSpec(cluster_ip="None", selector=dict(WORKER_LABEL),
                               publish_not_ready_addresses=True,
                               ports=[k8s.V1ServicePort(name="tf-grpc", port=PORT)]))


class MultiWorkerTrainJobOperator(KubernetesJobOperator):
    """`workers` pods of the same training command, training together as one cluster.

    :param workers: pods in the cluster (TF_CONFIG tasks `worker` 0..workers-1)
    """

    def __init__(self, *, workers: int, **kwargs: Any) -> None:
        super().__init__(completions=workers, parallelism=workers, completion_mode="Indexed",
                         backoff_limit=0, wait_until_job_complete=True, deferrable=False,
                         ttl_seconds_after_finished=600, labels=dict(WORKER_LABEL), **kwargs)
        self.workers = workers

    def build_job_request_obj(self, context: Any = None) -> k8s.V1Job:
        job = super().build_job_request_obj(context)
        hosts = [f"{job.metadata.name}-{i}.{SERVICE}:{PORT}" for i in range(self.workers)]
        pod = job.spec.template.spec
        pod.subdomain = SERVICE
        container = pod.containers[0]
        container.env = [*(container.env or []), k8s.V1EnvVar(name=HOSTS_ENV,
                                                              value=",".join(hosts))]
        container.ports = [k8s.V1ContainerPort(name="tf-grpc", container_port=PORT)]
        return job

    def ensure_service(self) -> None:
        try:
            self.hook.core_v1_client.create_namespaced_service(
                self.namespace, headless_service(self.namespace))
        except ApiException as exc:
            if exc.status != 409:  # 409: it exists already
                raise

    def execute(self, context: Any) -> Any:
        self.ensure_service()
        results = super().execute(context)
        return chief_result(self.pods, results)


def chief_result(pods: list[k8s.V1Pod], results: list[Any]) -> Any:
    """The result of the Job's pod 0, the chief (the others repeat it without its files)."""
    for pod, result in zip(pods, results):
        if (pod.metadata.annotations or {}).get(INDEX_ANNOTATION) == "0":
            return result
    raise RuntimeError(f"no pod with {INDEX_ANNOTATION}=0 among "
                       f"{[p.metadata.name for p in pods]}: the chief's result is missing")
