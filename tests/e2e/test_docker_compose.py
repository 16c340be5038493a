"""docker/: the compose file and the Dockerfile, checked by reading them (no Docker daemon here).

Paths are checked the way the containers will see them: the pipeline config the compose file
points at is loaded with the containers' ODAPI_HOME, and every path it resolves to must land
on a shared volume; what push writes into models.config must name the same folder inside the
TF Serving container.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from pathlib import PurePosixPath

import pytest
import yaml

from conftest import ROOT

DOCKER = ROOT / "docker"
COMPOSE_FILE = DOCKER / "docker-compose.yaml"
AIRFLOW = ("airflow-apiserver", "airflow-scheduler", "airflow-dag-processor",
           "airflow-triggerer", "airflow-worker", "airflow-worker-gpu", "airflow-init")
LONG_RUNNING_AIRFLOW = [s for s in AIRFLOW if s != "airflow-init"]
PORTS = {"airflow-apiserver": [8080], "tf-serving": [8500, 8501], "tensorboard": [6006]}


def interpolate(value: str) -> str:
    """Compose variable interpolation with every variable unset: `${X:-d}` -> d, `$$` -> `$`."""
    parts = value.split("$$")
    return "$".join(re.sub(r"\$\{\w+(?::?-([^}]*))?\}", lambda m: m.group(1) or "", part)
                    for part in parts)


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


def mounts(service: dict) -> dict[str, str]:
    """Container path -> source (named volume, or host path relative to the project root)."""
    found = {}
    for spec in service.get("volumes", []):
        source, target = interpolate(spec).split(":")[:2]
        if source.startswith("."):
            source = str((DOCKER / source).resolve().relative_to(ROOT))
        found[target] = source
    return found


def locate(service: dict, path: str) -> tuple[str, str]:
    """(source, path inside it) that `path` names in this container: its deepest mount."""
    pure = PurePosixPath(path)
    targets = [t for t in mounts(service) if pure == PurePosixPath(t)
               or PurePosixPath(t) in pure.parents]
    assert targets, f"{path} is on no volume of this service (mounts: {mounts(service)})"
    target = max(targets, key=len)
    return mounts(service)[target], str(pure.relative_to(target))


def command(service: dict) -> list[str]:
    cmd = service["command"]
    return shlex.split(cmd) if isinstance(cmd, str) else [interpolate(c) for c in cmd]


def init_script(services: dict) -> str:
    args = services["airflow-init"]["command"]
    assert services["airflow-init"]["entrypoint"] == "/bin/bash" and args[0] == "-c"
    return interpolate(args[1])


# --- compose ---------------------------------------------------------------------------------


def test_every_service_is_there(services):
    assert set(AIRFLOW) | {"postgres", "redis", "tf-serving", "tensorboard"} <= set(services)


def test_airflow_services_share_one_image_env_and_volumes(compose, services):
    common = compose["x-airflow-common"]
    env = common["environment"]
    assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("postgresql+psycopg2://")
    assert env["AIRFLOW__CELERY__RESULT_BACKEND"].startswith("db+postgresql://")
    assert env["AIRFLOW__CELERY__BROKER_URL"] == "redis://redis:6379/0"
    for url in (env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"], env["AIRFLOW__CELERY__RESULT_BACKEND"]):
        assert url.split("@")[1].split("/")[0].split(":")[0] == "postgres"
    assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"].startswith("http://airflow-apiserver:8080/")
    assert common["build"] == {"context": "..", "dockerfile": "docker/Dockerfile"}
    for name in AIRFLOW:
        service = services[name]
        assert service["environment"].items() >= env.items(), name
        assert service["volumes"] == common["volumes"], name
        assert service["build"]["dockerfile"] == "docker/Dockerfile", name
    assert all(services[n]["image"] == common["image"] for n in AIRFLOW if n != "airflow-worker-gpu")


def test_workers_consume_the_default_queue_and_the_gpu_queue(services):
    cpu, gpu = command(services["airflow-worker"]), command(services["airflow-worker-gpu"])
    assert cpu[:2] == ["celery", "worker"] and "-q" not in cpu and "--queues" not in cpu
    assert gpu[:2] == ["celery", "worker"] and gpu[gpu.index("-q") + 1] == "gpu"


def test_gpu_worker_reserves_nvidia_gpus_on_the_cuda_image(services):
    gpu = services["airflow-worker-gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert gpu["build"]["args"]["VARIANT"] == "gpu"
    assert gpu["image"] != services["airflow-worker"]["image"]
    assert gpu["profiles"] == ["gpu"]  # a CPU-only host still comes up


def test_serving_flags(services):
    serving = services["tf-serving"]
    assert serving["image"].startswith("tensorflow/serving:")
    flags = dict(arg.split("=", 1) for arg in command(serving))
    assert flags["--model_config_file_poll_wait_seconds"] == "30"
    assert flags["--file_system_poll_wait_seconds"] == "5"
    assert (flags["--port"], flags["--rest_api_port"]) == ("8500", "8501")
    pinned = re.search(r"^tensorflow-serving-api==(.+)$", (ROOT / "requirements.txt").read_text(),
                       re.M).group(1)
    assert serving["image"] == f"tensorflow/serving:{pinned}"


@pytest.fixture(scope="module")
def pipeline(services, monkeypatch_module):
    """The pipeline config the containers load, resolved as they resolve it."""
    from odapi_operators.core.config import load_pipeline_config

    env = services["airflow-worker"]["environment"]
    container = PurePosixPath(env["ODAPI_PIPELINE_CONFIG"])
    copies = [(source, PurePosixPath(target)) for source, target in re.findall(
        r"^COPY .*?(\S+) (/opt/odapi/\S+)$", (DOCKER / "Dockerfile").read_text(), re.M)]
    source, target = max(((s, t) for s, t in copies if t in container.parents),
                         key=lambda copy: len(copy[1].parts))  # the COPY that brings it
    monkeypatch_module.setenv("ODAPI_HOME", env["ODAPI_HOME"])
    return load_pipeline_config(ROOT / source / container.relative_to(target))


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def test_pipeline_paths_are_on_shared_volumes(services, pipeline):
    worker = services["airflow-worker"]
    assert locate(worker, pipeline.runs)[0] == "odapi-runs"
    assert locate(worker, pipeline.exports.path)[0] == "var/exports"  # the host's exports
    assert locate(worker, pipeline.serving.base)[0] == "odapi-serving"
    for path in (pipeline.datasets, pipeline.exports.ledger, pipeline.records.cache):
        assert locate(worker, path)[0] == "odapi-var", path
    tensorboard = services["tensorboard"]
    logdir = command(tensorboard)[command(tensorboard).index("--logdir") + 1]
    assert locate(tensorboard, logdir) == locate(worker, pipeline.runs)


def test_serving_reads_the_models_config_and_base_paths_push_writes(services, pipeline):
    from odapi_operators.core.serving.serving_dir import model_dir

    worker, serving = services["airflow-worker"], services["tf-serving"]
    cfg = pipeline.serving
    flags = dict(arg.split("=", 1) for arg in command(serving))
    assert locate(serving, flags["--model_config_file"]) == locate(
        worker, cfg.models_config_path(cfg.base))
    # base_path is read by Serving in its own container: it must name the folder push fills
    assert locate(serving, cfg.model_base_path(cfg.base, cfg.model_name)) == locate(
        worker, model_dir(cfg.base, cfg.model_name))


def test_published_ports_match_the_docker_readme(services):
    readme = (DOCKER / "README.md").read_text()
    for name, ports in PORTS.items():
        published = sorted(int(p.split(":")[0]) for p in services[name]["ports"])
        assert published == ports, name
        for port in ports:
            assert f"localhost:{port}" in readme, f"docker/README.md does not name port {port}"


def test_healthchecks_and_start_order(services):
    for name, service in services.items():
        assert name == "airflow-init" or "healthcheck" in service, name
    for name in LONG_RUNNING_AIRFLOW:
        needs = services[name]["depends_on"]
        assert needs["postgres"]["condition"] == needs["redis"]["condition"] == "service_healthy"
        assert needs["airflow-init"]["condition"] == "service_completed_successfully", name
    for name in ("airflow-worker", "airflow-worker-gpu"):
        assert services[name]["depends_on"]["airflow-apiserver"]["condition"] == "service_healthy"
    assert services["tf-serving"]["depends_on"]["airflow-init"]["condition"] == \
        "service_completed_successfully"  # models.config exists before Serving reads it


def test_init_migrates_and_creates_the_gpu_pool_and_serving_connection(services):
    script = init_script(services)
    assert "airflow db migrate" in script
    assert re.search(r"airflow pools set gpu 1 ", script)
    add = shlex.split(script[script.index("connections add"):].replace("\\\n", " ").split("\n")[0])
    options = dict(zip(add[3::2], add[4::2]))
    from odapi_operators.hooks import TFServingHook

    assert add[2] == TFServingHook.default_conn_name  # what push confirms label moves with
    assert options["--conn-host"] == "tf-serving" and options["--conn-port"] == "8500"
    assert json.loads(options["--conn-extra"]) == {"rest_url": "http://tf-serving:8501"}


@pytest.mark.skipif(not shutil.which("bash"), reason="no bash")
def test_init_script_is_valid_bash(services):
    done = subprocess.run(["bash", "-n"], input=init_script(services), capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr


def test_docker_compose_config_validates():
    docker = shutil.which("docker")
    if not docker or subprocess.run([docker, "compose", "version"],
                                    capture_output=True).returncode != 0:
        pytest.skip("the docker compose plugin is not installed here")
    done = subprocess.run([docker, "compose", "-f", str(COMPOSE_FILE), "--profile", "gpu",
                           "config", "-q"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


# --- Dockerfile ------------------------------------------------------------------------------


def test_dockerfile_builds_on_airflow_and_installs_the_pinned_requirements():
    text = (DOCKER / "Dockerfile").read_text()
    froms = re.findall(r"^FROM (\S+)(?: AS (\S+))?$", text, re.M)
    assert froms[0][0] == "apache/airflow:3.3.2-python3.11"
    assert re.search(r"^RUN pip install .*-r /opt/odapi/requirements\.txt$", text, re.M)
    assert re.search(r"^COPY .*requirements\.txt /opt/odapi/requirements\.txt$", text, re.M)
    default = re.search(r"^ARG VARIANT=(\w+)$", text, re.M).group(1)
    stages = {alias for _, alias in froms if alias}
    assert froms[-1][0] == "deps-${VARIANT}" and {f"deps-{default}", "deps-gpu"} <= stages


def test_gpu_variant_installs_cuda_tensorflow_at_the_pinned_version():
    text = (DOCKER / "Dockerfile").read_text()
    gpu_stage = text[text.index("AS deps-gpu"):].split("\nFROM ")[0]
    assert '"tensorflow[and-cuda]==${TENSORFLOW_VERSION}"' in gpu_stage
    sed = re.search(r"sed -n '([^']+)' /opt/odapi/requirements\.txt", gpu_stage).group(1)
    version = subprocess.run(["sed", "-n", sed, str(ROOT / "requirements.txt")],
                             capture_output=True, text=True, check=True).stdout.split()
    pinned = re.search(r"^tensorflow==(.+)$", (ROOT / "requirements.txt").read_text(), re.M)
    assert version == [pinned.group(1)]
