"""Where training runs: the generated task for each placement (local, Celery, Kubernetes pod).

Celery routing runs for real in tests/e2e/test_production_paths.py; a Kubernetes cluster cannot
run here, so the pod the KubernetesPodOperator would create is checked as a spec.
"""

from __future__ import annotations

import json
from datetime import datetime

import pytest
from airflow.sdk import DAG

from odapi_operators.core.config import TrainPlacement
from odapi_operators.operators import TrainDetectorOperator
from odapi_operators.placement import XCOM_RETURN, train_task


@pytest.fixture()
def kubeconfig(tmp_path, monkeypatch):
    """A kubeconfig naming a cluster that is never contacted: building the pod spec reads
    it (is the worker in a cluster?), nothing connects."""
    path = tmp_path / "kubeconfig"
    path.write_text("""apiVersion: v1
kind: Config
clusters: [{name: c, cluster: {server: "https://127.0.0.1:1"}}]
users: [{name: u, user: {token: t}}]
contexts: [{name: x, context: {cluster: c, user: u}}]
current-context: x
""")
    monkeypatch.setenv("KUBECONFIG", str(path))


def _task(placement: dict):
    with DAG("placement_test", schedule=None, start_date=datetime(2026, 1, 1)):
        return train_task("train", config="/runs/r1/config/pipeline.json", data="/runs/r1/records",
                          placement=TrainPlacement.model_validate(placement))


def test_local_is_a_child_process_in_the_gpu_pool():
    task = _task({})
    assert isinstance(task, TrainDetectorOperator)
    assert task.pool == "gpu" and task.queue == "default"


def test_celery_goes_to_the_gpu_queue():
    task = _task({"where": "celery", "queue": "gpu", "pool": "gpu"})
    assert isinstance(task, TrainDetectorOperator)
    assert (task.queue, task.pool) == ("gpu", "gpu")


def test_no_pool_means_the_default_pool():
    assert _task({"pool": None}).pool == "default_pool"


def test_kubernetes_pod_requests_gpus_and_runs_the_same_command(kubeconfig):
    task = _task({"where": "kubernetes", "kubernetes": {
        "image": "registry.example.com/odapi:1.2", "namespace": "ml", "gpus": 2,
        "volume_claim": "odapi-var", "mount_path": "/opt/odapi/var",
        "node_selector": {"cloud.google.com/gke-accelerator": "nvidia-l4"},
        "service_account": "odapi-train"}})
    assert type(task).__name__ == "KubernetesPodOperator"
    assert task.pool == "gpu" and task.do_xcom_push and task.multiple_outputs
    task.render_template_fields({"run_id": "scheduled__2026-03-02"})
    pod = task.build_pod_request_obj()
    container = pod.spec.containers[0]
    assert container.image == "registry.example.com/odapi:1.2"
    assert container.command == ["odapi"]
    assert container.args == ["stage", "run", "train",
                              "--pipeline", "/runs/r1/config/pipeline.json",
                              "--run-id", "scheduled__2026-03-02",
                              "--input", "data", "/runs/r1/records",
                              "--result-file", XCOM_RETURN]
    assert container.resources.limits == {"nvidia.com/gpu": "2"}
    assert container.resources.requests == {"nvidia.com/gpu": "2"}
    assert [t.key for t in pod.spec.tolerations] == ["nvidia.com/gpu"]
    assert pod.metadata.namespace == "ml"
    assert pod.spec.node_selector == {"cloud.google.com/gke-accelerator": "nvidia-l4"}
    assert pod.spec.service_account_name == "odapi-train"
    [volume] = [v for v in pod.spec.volumes if v.name == "odapi-var"]
    assert volume.persistent_volume_claim.claim_name == "odapi-var"
    assert any(m.mount_path == "/opt/odapi/var" for m in container.volume_mounts)
    # the XCom sidecar that carries the summary back to Airflow
    assert any(c.name == "airflow-xcom-sidecar" for c in pod.spec.containers)
    env = {e.name: e.value for e in container.env}
    assert env["TF_USE_LEGACY_KERAS"] == "1"


def test_cpu_only_pod_requests_no_gpu(kubeconfig):
    task = _task({"where": "kubernetes", "kubernetes": {"gpus": 0}})
    pod = task.build_pod_request_obj()
    assert not (pod.spec.containers[0].resources and
                pod.spec.containers[0].resources.limits)
    assert not pod.spec.tolerations


def test_multi_worker_is_one_indexed_job_of_the_same_command(kubeconfig):
    """workers: 3 -> one task whose Job runs three pods of the single-pod command, each
    reaching the others by name through the headless Service, each its own TF_CONFIG task."""
    from odapi_operators.core.model import cluster
    from odapi_operators.training_job import (
        PORT,
        SERVICE,
        WORKER_LABEL,
        MultiWorkerTrainJobOperator,
        headless_service,
    )

    task = _task({"where": "kubernetes", "kubernetes": {
        "image": "odapi:1.2", "namespace": "ml", "gpus": 1, "workers": 3,
        "volume_claim": "odapi-var"}})
    assert isinstance(task, MultiWorkerTrainJobOperator) and task.pool == "gpu"
    assert task.do_xcom_push and task.multiple_outputs
    task.render_template_fields({"run_id": "scheduled__2026-03-02"})
    job = task.build_job_request_obj()
    single = _task({"where": "kubernetes", "kubernetes": {
        "image": "odapi:1.2", "namespace": "ml", "gpus": 1, "volume_claim": "odapi-var"}})
    single.render_template_fields({"run_id": "scheduled__2026-03-02"})
    single_container = single.build_pod_request_obj().spec.containers[0]

    spec = job.spec
    assert (spec.completions, spec.parallelism, spec.completion_mode) == (3, 3, "Indexed")
    assert spec.backoff_limit == 0  # a lost pod fails the Job; the task's retry resumes
    pod = spec.template.spec
    assert pod.subdomain == SERVICE
    assert spec.template.metadata.labels.items() >= WORKER_LABEL.items()
    container = pod.containers[0]
    assert (container.command, container.args) == (single_container.command,
                                                   single_container.args)
    assert container.resources.limits == {"nvidia.com/gpu": "1"}
    assert any(v.persistent_volume_claim and v.persistent_volume_claim.claim_name == "odapi-var"
               for v in pod.volumes)
    assert any(c.name == "airflow-xcom-sidecar" for c in pod.containers)
    env = {e.name: e.value for e in container.env}
    hosts = [f"{job.metadata.name}-{i}.{SERVICE}:{PORT}" for i in range(3)]
    assert env[cluster.HOSTS_ENV] == ",".join(hosts)

    # each pod: Kubernetes adds its index; the training command makes TF_CONFIG of it
    for index in range(3):
        pod_env = {**env, cluster.INDEX_ENV: str(index)}
        cluster.configure_from_job(pod_env)
        assert json.loads(pod_env["TF_CONFIG"]) == {
            "cluster": {"worker": hosts}, "task": {"type": "worker", "index": index}}
        role = cluster.role(pod_env)
        assert (role.workers, role.index, role.is_chief) == (3, index, index == 0)

    service = headless_service("ml")
    assert service.metadata.name == SERVICE and service.metadata.namespace == "ml"
    assert service.spec.cluster_ip == "None" and service.spec.selector == WORKER_LABEL
    assert service.spec.publish_not_ready_addresses
    assert [p.port for p in service.spec.ports] == [PORT]


def test_the_chiefs_result_is_the_tasks_whatever_the_pod_order():
    from kubernetes.client import models as k8s

    from odapi_operators.training_job import INDEX_ANNOTATION, chief_result

    pods = [k8s.V1Pod(metadata=k8s.V1ObjectMeta(name=f"p{i}",
                                                annotations={INDEX_ANNOTATION: str(i)}))
            for i in (1, 0, 2)]
    assert chief_result(pods, ["w1", "chief", "w2"]) == "chief"
    with pytest.raises(RuntimeError, match="chief's result is missing"):
        chief_result(pods[:1], ["w1"])
