"""models.config through the real tensorflow_serving protos: policies, labels, two-step moves."""

from __future__ import annotations

import multiprocessing
import subprocess
import sys

import pytest
from google.protobuf import text_format
from pydantic import ValidationError
from tensorflow_serving.config import model_server_config_pb2 as pb

from odapi_operators.core.serving import models_config as sc
from odapi_operators.core.serving.models_config import ServingConfigError, ServingOptions

from conftest import join_all

OTHER = """
model_config_list {
  config {
    name: "other"
    base_path: "/models/other"
    model_platform: "tensorflow"
    model_version_policy { all {} }
    version_labels { key: "stable" value: 7 }
  }
}
"""


def parsed(path) -> pb.ModelServerConfig:
    """Parse independently of the module under test."""
    return text_format.Parse(path.read_text(), pb.ModelServerConfig())


def test_protos_do_not_import_tensorflow():
    code = ("import sys; import odapi_operators.core.serving.models_config, odapi_operators.core.serving.push, "
            "odapi_operators.core.serving.rollback, odapi_operators.core.evaluation.gate, "
            "odapi_operators.cli_models; print('tensorflow' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_round_trip_labels_and_specific_policy(tmp_path):
    path = tmp_path / "models.config"
    path.write_text(OTHER)

    def change(config):
        model = sc.ensure_entry(config, "shapes", "/models/shapes")
        sc.serve(model, 2, [1, 2])
        sc.set_label(model, "stable", 2, [1, 2])
        sc.serve(model, 1, [1, 2])
        sc.set_label(model, "canary", 1, [1, 2])

    sc.update(path, change)
    config = parsed(path)
    other, shapes = config.model_config_list.config
    assert other == parsed_other()  # untouched, byte for byte as a message
    assert (shapes.name, shapes.base_path, shapes.model_platform) == (
        "shapes", "/models/shapes", "tensorflow")
    assert list(shapes.model_version_policy.specific.versions) == [1, 2]
    assert dict(shapes.version_labels) == {"stable": 2, "canary": 1}
    assert sc.read(path) == config
    assert sc.parse(sc.render(config)) == config


def parsed_other() -> pb.ModelConfig:
    return text_format.Parse(OTHER, pb.ModelServerConfig()).model_config_list.config[0]


@pytest.mark.parametrize("policy,kind,served", [
    ("labelled", "specific", [2, 5]),
    ("latest", "latest", [4, 5]),
    ("all", "all", [1, 2, 3, 4, 5]),
])
def test_policies_written_as_serving_reads_them(tmp_path, policy, kind, served):
    path = tmp_path / "models.config"
    available = [1, 2, 3, 4, 5]

    def change(config):
        model = sc.ensure_entry(config, "shapes", "/m/shapes")
        model.version_labels["stable"] = 4 if policy == "latest" else 2
        sc.serve(model, 5, available, policy, latest_versions=2)

    sc.update(path, change)
    model = parsed(path).model_config_list.config[0]
    assert model.model_version_policy.WhichOneof("policy_choice") == kind
    if kind == "latest":
        assert model.model_version_policy.latest.num_versions == 2
    assert sc.served(model, available) == served
    assert sc.current_policy(model).version_policy == policy


def test_no_policy_means_serving_default_latest_one():
    model = pb.ModelConfig(name="m")
    assert sc.policy_kind(model) == "latest"
    assert sc.served(model, [1, 2, 3]) == [3]
    assert sc.current_policy(model).model_dump()["latest_versions"] == 1


def test_latest_policy_refuses_to_drop_a_labelled_version():
    model = pb.ModelConfig(name="m", base_path="/b")
    model.version_labels["stable"] = 1
    with pytest.raises(ServingConfigError, match=r"would not serve version\(s\) \[1\]"):
        sc.serve(model, 3, [1, 2, 3], "latest", latest_versions=2)


def test_label_only_on_a_served_version_and_valid_name():
    model = pb.ModelConfig(name="m", base_path="/b")
    sc.serve(model, 1, [1, 2])
    with pytest.raises(ServingConfigError, match="not served yet"):
        sc.set_label(model, "stable", 2, [1, 2])
    with pytest.raises(ServingConfigError, match="only"):
        sc.set_label(model, "stable-1", 1, [1, 2])
    with pytest.raises(ServingConfigError, match="/b/9: not a complete version"):
        sc.serve(model, 9, [1, 2])


def test_two_step_move_writes_both_versions_first(tmp_path):
    path = tmp_path / "models.config"
    sc.move_label(path, "shapes", "/m/shapes", "stable", 1, [1])
    seen = []

    def wait(version):  # runs between the two writes, as the Serving hook would
        model = parsed(path).model_config_list.config[0]
        seen.append((version, list(model.model_version_policy.specific.versions),
                     dict(model.version_labels)))

    after = sc.move_label(path, "shapes", "/m/shapes", "stable", 2, [1, 2], wait=wait)
    assert seen == [(2, [1, 2], {"stable": 1})]  # step 1: serve both, label unchanged
    assert after == {"stable": 2}
    model = parsed(path).model_config_list.config[0]
    assert dict(model.version_labels) == {"stable": 2}  # step 2: the label
    assert list(model.model_version_policy.specific.versions) == [1, 2]  # old kept loaded


def test_next_move_drops_unlabelled_versions(tmp_path):
    path = tmp_path / "models.config"
    for version in (1, 2, 3):
        sc.move_label(path, "shapes", "/m", "stable", version, [1, 2, 3])
    model = parsed(path).model_config_list.config[0]
    assert list(model.model_version_policy.specific.versions) == [2, 3]


def test_garbage_file_is_an_error_naming_it(tmp_path):
    path = tmp_path / "models.config"
    path.write_text("model_config_list { config { nme: 'x' } }")
    with pytest.raises(ServingConfigError, match=str(path)):
        sc.read(path)


def test_missing_file_reads_as_empty(tmp_path):
    assert sc.read(tmp_path / "absent.config") == pb.ModelServerConfig()


def test_stale_temp_from_killed_writer_is_removed(tmp_path):
    path = tmp_path / "models.config"
    (tmp_path / ".tmp-models.config-deadbeef").write_text("half")
    sc.update(path, lambda c: sc.ensure_entry(c, "m", "/m"))
    assert sorted(p.name for p in tmp_path.iterdir()) == [".models.config.lock", "models.config"]


def _label_many(path: str, name: str) -> None:
    for version in range(1, 11):
        sc.move_label(path, name, f"/m/{name}", "stable", version, list(range(1, 11)))


def test_concurrent_writers_lose_no_update(tmp_path):
    path = str(tmp_path / "models.config")
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_label_many, args=(path, name)) for name in ("a", "b", "c")]
    for proc in procs:
        proc.start()
    join_all(procs, 30)
    config = sc.read(path)
    assert {m.name: dict(m.version_labels) for m in config.model_config_list.config} == {
        name: {"stable": 10} for name in ("a", "b", "c")}


def test_options_default_paths_and_validation():
    options = ServingOptions()
    assert options.models_config_path("/srv/") == "/srv/models.config"
    assert options.registry_path("gs://b/serving") == "gs://b/serving/registry.jsonl"
    assert ServingOptions(base_in_serving="/models").model_base_path("/srv", "m") == "/models/m"
    with pytest.raises(ValidationError, match="keep_versions"):
        ServingOptions(keep_versions=0)
    with pytest.raises(ValidationError, match="version_policy"):
        ServingOptions(version_policy="newest")
