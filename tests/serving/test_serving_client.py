"""ServingClient over real gRPC and REST against the Serving stand-in, confirm_served, the hook."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from odapi_operators.core.serving import models_config as serving_config
from odapi_operators.core.serving.client import (
    ServingClient,
    ServingError,
    ServingNotFound,
    confirm_served,
    from_json,
    to_json,
)
from odapi_operators.core.serving.models_config import ServingOptions

from conftest import ROOT

PROTOCOLS = ["grpc", "rest"]


@pytest.fixture(scope="module")
def served(exported_model, tmp_path_factory):
    """Version 1 of `shapes` pushed and labelled stable, a running stand-in, one client per
    protocol."""
    from odapi_operators.core.serving.promote import promote
    from odapi_operators.core.serving.push import push

    from support.serving_standin import ServingStandin

    base = tmp_path_factory.mktemp("serving")
    push(exported_model, base, "shapes", "run-1")
    promote(base, "shapes", 1)
    with ServingStandin(base / "models.config") as standin:
        clients = {"grpc": ServingClient(grpc_address=standin.grpc_address, timeout=60),
                   "rest": ServingClient(rest_url=standin.rest_url, timeout=60)}
        clients["grpc"].wait_until_available("shapes", 1, timeout_s=300, poll_s=0.2)
        yield {"base": base, "standin": standin, "clients": clients,
               "saved_model": exported_model}
        for client in clients.values():
            client.close()


def _first_warmup_input(saved_model: Path) -> np.ndarray:
    from odapi_operators.core.model.saved_model import WARMUP_FILE, read_warmup

    return read_warmup(saved_model / "assets.extra" / WARMUP_FILE)[0]


@pytest.mark.slow
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_model_status(served, protocol):
    client = served["clients"][protocol]
    assert client.protocol == protocol
    expected = [{"version": 1, "state": "AVAILABLE", "error": None}]
    assert client.model_status("shapes") == expected
    assert client.model_status("shapes", version=1) == expected
    with pytest.raises(ServingNotFound, match="Could not find any versions of model nope"):
        client.model_status("nope")


@pytest.mark.slow
def test_wait_until_available_sees_loading_then_available(served):
    from odapi_operators.core.serving.push import push

    standin, client = served["standin"], served["clients"]["grpc"]
    standin.load_delay_s = 1.5
    try:
        version = push(served["saved_model"], served["base"], "shapes", "run-2")["version"]
        assert client.model_status("shapes", version)[0]["state"] == "LOADING"
        status = client.wait_until_available("shapes", version, timeout_s=60, poll_s=0.2)
    finally:
        standin.load_delay_s = 0.0
    assert status["state"] == "AVAILABLE" and status["version"] == version
    assert status["waited_s"] >= 1.0


@pytest.mark.slow
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_wait_until_available_times_out_naming_version_and_state(served, protocol):
    client = served["clients"][protocol]
    start = time.monotonic()
    with pytest.raises(TimeoutError) as caught:
        client.wait_until_available("shapes", 99, timeout_s=1, poll_s=0.2)
    assert time.monotonic() - start < 5
    message = str(caught.value)
    assert "model 'shapes' version 99 not AVAILABLE after 1 s" in message
    assert "last state NOT FOUND" in message and "Could not find version 99" in message


@pytest.mark.slow
def test_a_version_that_fails_to_load_raises_at_once(served):
    broken = served["base"] / "broken"
    (broken / "3").mkdir(parents=True)
    (broken / "3" / "saved_model.pb").write_bytes(b"not a graph")
    serving_config.update(served["base"] / "models.config",
                          lambda c: serving_config.ensure_entry(c, "broken", str(broken)))
    start = time.monotonic()
    with pytest.raises(ServingError, match=r"'broken' version 3 failed to load \(state END\): "
                                           r"Failed to load"):
        served["clients"]["rest"].wait_until_available("broken", 3, timeout_s=60, poll_s=0.2)
    assert time.monotonic() - start < 30


@pytest.mark.slow
def test_predict_over_both_protocols_matches_the_saved_model(served):
    import tensorflow as tf

    inputs = _first_warmup_input(served["saved_model"])
    loaded = tf.saved_model.load(str(served["saved_model"]), tags=["serve"])
    expected = loaded.signatures["serving_default"](inputs=tf.constant(inputs))
    by_version = served["clients"]["grpc"].predict("shapes", {"inputs": inputs}, version=1)
    by_label = served["clients"]["rest"].predict("shapes", {"inputs": inputs}, label="stable")
    for outputs in (by_version, by_label):
        assert set(outputs) == set(expected)
        for key in ("detection_boxes", "detection_scores", "num_detections"):
            np.testing.assert_allclose(outputs[key], expected[key].numpy(), atol=1e-5)
    with pytest.raises(ServingNotFound, match="Unrecognized servable version label: canary"):
        served["clients"]["rest"].predict("shapes", {"inputs": inputs}, label="canary")


@pytest.mark.slow
def test_reload_config_sends_the_proto_we_wrote(served):
    written = serving_config.read(served["base"] / "models.config")
    served["clients"]["grpc"].reload_config(written)
    assert served["standin"].reloads[-1] == written
    with pytest.raises(NotImplementedError, match="REST API cannot reload the model config"):
        served["clients"]["rest"].reload_config(written)


@pytest.mark.slow
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_confirm_served_waits_and_predicts_with_the_warmup_request(served, protocol):
    summary = confirm_served(served["clients"][protocol], "shapes", 1,
                             served["base"] / "shapes" / "1", timeout_s=30)
    assert summary["model_name"] == "shapes" and summary["version"] == 1
    assert summary["state"] == "AVAILABLE" and summary["protocol"] == protocol
    assert summary["num_outputs"] >= 4 and summary["detections"] >= 0
    assert summary["latency_ms"] > 0
    assert served["standin"].predictions[-1] == ("shapes", 1)


def _readme_calls() -> tuple[str, str]:
    """The README's curl line and gRPC snippet ("Calling the served model")."""
    section = (ROOT / "README.md").read_text().split("### Calling the served model")[1]
    section = section.split("\n## ")[0]
    curl = re.search(r"```bash\n(curl .*?)\n```", section, re.S).group(1)
    return curl, re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow
def test_the_readmes_rest_and_grpc_calls_get_the_od_api_answer(served, tmp_path, monkeypatch):
    """The README's own curl (base64 JPEG bytes, row format, `image_bytes` signature, label
    `stable`) and gRPC snippet, run as written against the stand-in: both get what
    `serving_default` answers for the same bytes, in the OD API contract."""
    from odapi_operators.core.data.label_map import read_label_map
    from odapi_operators.core.model.saved_model import DETECTION_OUTPUTS

    image = _first_warmup_input(served["saved_model"])[0]  # an image_bytes export: encoded
    (tmp_path / "image.jpg").write_bytes(image)
    expected = {k: v[0] for k, v in served["clients"]["grpc"].predict(  # serving_default
        "shapes", {"inputs": np.array([image], dtype=object)}, version=1).items()}
    count = int(expected["num_detections"])
    assert count > 0
    standin, (curl, snippet) = served["standin"], _readme_calls()

    done = subprocess.run(["bash", "-c", curl.replace("http://localhost:8501", standin.rest_url)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    [answer] = json.loads(done.stdout)["predictions"]
    assert set(answer) == set(DETECTION_OUTPUTS) and answer["num_detections"] == count
    for key in ("detection_boxes", "detection_classes", "detection_scores"):
        np.testing.assert_allclose(np.asarray(answer[key])[:count], expected[key][:count],
                                   atol=1e-5)
    boxes = np.asarray(answer["detection_boxes"])[:count]
    assert boxes.min() >= 0 and boxes.max() <= 1
    label_ids = set(read_label_map(served["saved_model"] / "assets.extra" /
                                   "label_map.pbtxt").values())
    assert set(answer["detection_classes"][:count]) <= label_ids

    monkeypatch.chdir(tmp_path)
    grpc_call: dict = {}
    exec(snippet.replace("localhost:8500", standin.grpc_address), grpc_call)
    assert grpc_call["count"] == count
    np.testing.assert_allclose(grpc_call["boxes"], expected["detection_boxes"][:count], atol=1e-5)
    assert set(grpc_call["classes"].tolist()) <= label_ids


def test_json_tensors_keep_bytes_and_numbers():
    blobs = np.array([b"\x00\xff", b"jpeg"], dtype=object)
    assert to_json(blobs) == [{"b64": "AP8="}, {"b64": "anBlZw=="}]
    assert from_json(to_json(blobs)).tolist() == blobs.tolist()
    image = np.arange(12, dtype=np.uint8).reshape(1, 2, 2, 3)
    assert np.array_equal(from_json(json.loads(json.dumps(to_json(image)))), image)


def test_client_needs_an_address():
    with pytest.raises(ValueError, match="needs a gRPC address or a REST URL"):
        ServingClient()


# --- the hook ------------------------------------------------------------------------------


def test_hook_reads_the_connection(monkeypatch):
    from odapi_operators.hooks import TFServingHook, serving_addresses

    monkeypatch.setenv("AIRFLOW_CONN_TF_SERVING_DEFAULT", json.dumps(
        {"conn_type": "tf_serving", "host": "serving.internal", "port": 9500,
         "extra": {"rest_url": "http://serving.internal:8501"}}))
    monkeypatch.setenv("AIRFLOW_CONN_SERVING_REST", json.dumps(
        {"conn_type": "tf_serving", "extra": {"rest_url": "http://serving.internal:8501"}}))
    with TFServingHook().get_client() as client:
        assert repr(client) == "ServingClient(grpc: serving.internal:9500)"
    with TFServingHook("serving_rest").get_client() as client:
        assert repr(client) == "ServingClient(rest: http://serving.internal:8501)"
    assert serving_addresses(ServingOptions()) == {"grpc_address": "serving.internal:9500",
                                                   "rest_url": "http://serving.internal:8501"}
    assert serving_addresses(ServingOptions(rest_url="http://other:8501")) == {
        "rest_url": "http://other:8501"}  # the pipeline's address wins
    assert serving_addresses(ServingOptions(), "no_such_connection") == {}
