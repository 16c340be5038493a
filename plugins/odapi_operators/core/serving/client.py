"""Talk to a running TF Serving: model status, config reload, predictions; confirm a version.

One client, two protocols: gRPC (`ModelService`, `PredictionService`) and REST
(`/v1/models/NAME[/versions/V|/labels/L][:predict]`); gRPC is used when both addresses are
given. Only gRPC can reload the model config; over REST Serving learns a new models.config
from its own poll (`--model_config_file_poll_wait_seconds`).

`confirm_served` is the live half of a label move: before `stable` points at a version, wait
until Serving reports it AVAILABLE and have it answer one real request (the first warmup
record shipped in the version's `assets.extra/`). `move_confirmed` wires that into
`promote` / `rollback` as their `wait`.

Serving's status API ignores labels (it answers every version of the model); labels only
select the version of a prediction.
"""

from __future__ import annotations

import base64
import os
import time
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import requests

from odapi_operators.core import storage
from odapi_operators.core.model.saved_model import (
    DETECTION_OUTPUTS,
    INPUT_NAME,
    SERVING_SIGNATURE,
    WARMUP_FILE,
    read_warmup,
)
from odapi_operators.core.progress import Log
from odapi_operators.core.serving import models_config as serving_config
from odapi_operators.core.serving.models_config import ServingOptions
from odapi_operators.core.serving.serving_dir import model_dir

if TYPE_CHECKING:
    from tensorflow_serving.config.model_server_config_pb2 import ModelServerConfig

AVAILABLE, END = "AVAILABLE", "END"
_GRPC_OPTIONS = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]


class ServingError(RuntimeError):
    """Serving answered with an error (the message says which server, model and why)."""


class ServingNotFound(ServingError):
    """Serving does not know the model or version (yet)."""


class ServingUnreachable(ServingError):
    """No answer from Serving (down, restarting, wrong address, timed out)."""


def _status(version: Any, state: str, code: Any, message: str) -> dict:
    ok = code in (0, "OK", None, "")
    return {"version": int(version), "state": state,
            "error": None if ok else (message or str(code))}


# --- gRPC ----------------------------------------------------------------------------------


class _Grpc:
    protocol = "grpc"

    def __init__(self, address: str, timeout: float) -> None:
        import grpc
        from tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc

        self.address, self.timeout = address, timeout
        self.channel = grpc.insecure_channel(address, options=_GRPC_OPTIONS)
        self.models = model_service_pb2_grpc.ModelServiceStub(self.channel)
        self.predictions = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)

    def _call(self, method: Callable, request: Any) -> Any:
        import grpc

        try:
            return method(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            code, details = exc.code(), exc.details()
            message = f"{self.address} (gRPC): {code.name}: {details}"
            if code == grpc.StatusCode.NOT_FOUND:
                raise ServingNotFound(message) from None
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise ServingUnreachable(message) from None
            raise ServingError(message) from None

    @staticmethod
    def _spec(name: str, version: int | None, label: str | None, signature: str = ""):
        from tensorflow_serving.apis import model_pb2

        spec = model_pb2.ModelSpec(name=name, signature_name=signature)
        if version is not None:
            spec.version.value = version
        elif label is not None:
            spec.version_label = label
        return spec

    def status(self, name: str, version: int | None, label: str | None) -> list[dict]:
        from tensorflow_serving.apis import get_model_status_pb2 as pb

        response = self._call(self.models.GetModelStatus, pb.GetModelStatusRequest(
            model_spec=self._spec(name, version, label)))
        return [_status(s.version, pb.ModelVersionStatus.State.Name(s.state),
                        s.status.error_code, s.status.error_message)
                for s in response.model_version_status]

    def reload_config(self, config: ModelServerConfig) -> None:
        from tensorflow_serving.apis import model_management_pb2

        response = self._call(self.models.HandleReloadConfigRequest,
                              model_management_pb2.ReloadConfigRequest(config=config))
        if response.status.error_code:
            raise ServingError(f"{self.address} (gRPC): config reload refused: "
                               f"{response.status.error_message}")

    def predict(self, name: str, inputs: dict[str, np.ndarray], version: int | None,
                label: str | None, signature: str) -> dict[str, np.ndarray]:
        import tensorflow as tf
        from tensorflow_serving.apis import predict_pb2

        request = predict_pb2.PredictRequest(
            model_spec=self._spec(name, version, label, signature))
        for key, array in inputs.items():
            request.inputs[key].CopyFrom(tf.make_tensor_proto(array))
        response = self._call(self.predictions.Predict, request)
        return {key: tf.make_ndarray(proto) for key, proto in response.outputs.items()}

    def close(self) -> None:
        self.channel.close()


# --- REST ----------------------------------------------------------------------------------


def to_json(value: Any) -> Any:
    """An array (as nested lists) in Serving's JSON: bytes become {"b64": ...}."""
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, bytes):
        return {"b64": base64.b64encode(value).decode("ascii")}
    if isinstance(value, list):
        return [to_json(v) for v in value]
    return value


def _decode(value: Any) -> Any:
    if isinstance(value, dict) and set(value) == {"b64"}:
        return base64.b64decode(value["b64"])
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


def from_json(value: Any) -> np.ndarray:
    """The array of a JSON tensor (strings and b64 objects -> object array of bytes)."""
    decoded = _decode(value)
    leaf = decoded
    while isinstance(leaf, list) and leaf:
        leaf = leaf[0]
    if isinstance(leaf, (bytes, str)):
        return np.array(decoded, dtype=object)
    return np.asarray(decoded)


class _Rest:
    protocol = "rest"

    def __init__(self, url: str, timeout: float) -> None:
        self.url, self.timeout = url.rstrip("/"), timeout
        self.session = requests.Session()

    def _path(self, name: str, version: int | None, label: str | None) -> str:
        if version is not None:
            return f"{self.url}/v1/models/{name}/versions/{version}"
        if label is not None:
            return f"{self.url}/v1/models/{name}/labels/{label}"
        return f"{self.url}/v1/models/{name}"

    def _call(self, method: str, url: str, body: dict | None = None) -> dict:
        try:
            response = self.session.request(method, url, json=body, timeout=self.timeout)
        except requests.RequestException as exc:
            raise ServingUnreachable(f"{url} (REST): {exc}") from None
        if response.ok:
            return response.json()
        try:
            error = response.json().get("error", response.text)
        except ValueError:
            error = response.text
        message = f"{url} (REST): HTTP {response.status_code}: {error}"
        if response.status_code == 404:
            raise ServingNotFound(message)
        if response.status_code in (502, 503, 504):
            raise ServingUnreachable(message)
        raise ServingError(message)

    def status(self, name: str, version: int | None, label: str | None) -> list[dict]:
        body = self._call("GET", self._path(name, version, label))
        return [_status(s["version"], s["state"], s.get("status", {}).get("error_code"),
                        s.get("status", {}).get("error_message", ""))
                for s in body.get("model_version_status", [])]

    def reload_config(self, config: ModelServerConfig) -> None:
        raise NotImplementedError(
            f"{self.url}: TF Serving's REST API cannot reload the model config; give a gRPC "
            "address, or let Serving poll the file (--model_config_file_poll_wait_seconds)")

    def predict(self, name: str, inputs: dict[str, np.ndarray], version: int | None,
                label: str | None, signature: str) -> dict[str, np.ndarray]:
        body = self._call("POST", self._path(name, version, label) + ":predict",
                          {"signature_name": signature,
                           "inputs": {k: to_json(np.asarray(v)) for k, v in inputs.items()}})
        outputs = body["outputs"]
        if not isinstance(outputs, dict):  # Serving leaves out the name of a lone output
            outputs = {"outputs": outputs}
        return {key: from_json(value) for key, value in outputs.items()}

    def close(self) -> None:
        self.session.close()


# --- the client ----------------------------------------------------------------------------


class ServingClient:
    """A TF Serving client over gRPC (`host:port`, preferred) or REST (`http://host:port`)."""

    def __init__(self, grpc_address: str | None = None, rest_url: str | None = None,
                 timeout: float = 10) -> None:
        if grpc_address:
            self._transport: _Grpc | _Rest = _Grpc(grpc_address, timeout)
        elif rest_url:
            self._transport = _Rest(rest_url, timeout)
        else:
            raise ValueError("ServingClient needs a gRPC address or a REST URL")

    @property
    def protocol(self) -> str:
        """`grpc` or `rest`: the protocol every call uses."""
        return self._transport.protocol

    def __repr__(self) -> str:
        target = getattr(self._transport, "address", None) or getattr(self._transport, "url")
        return f"ServingClient({self.protocol}: {target})"

    def model_status(self, name: str, version: int | None = None,
                     label: str | None = None) -> list[dict]:
        """[{version, state (START..END), error (None if OK)}] by version; ServingNotFound if
        Serving does not know the model (or that version)."""
        return sorted(self._transport.status(name, version, label), key=lambda s: s["version"])

    def wait_until_available(self, name: str, version: int, timeout_s: float = 300,
                             poll_s: float = 1.0) -> dict:
        """Poll until `version` is AVAILABLE; returns its status plus `waited_s`.

        Not found yet, LOADING, END without error (unloaded earlier, may load again once
        Serving reads the new config) and unreachable servers are waited out; END with an
        error (the load failed, Serving will not retry) raises ServingError at once, the
        deadline TimeoutError; both name the model, version, last state and error.
        """
        start = time.monotonic()
        while True:
            last = self._version_state(name, version)
            waited = time.monotonic() - start
            if last["state"] == AVAILABLE:
                return {**last, "version": version, "waited_s": round(waited, 3)}
            if last["state"] == END and last["error"]:
                raise ServingError(f"{self!r}: model {name!r} version {version} failed to "
                                   f"load (state END): {last['error']}")
            if waited >= timeout_s:
                raise TimeoutError(
                    f"{self!r}: model {name!r} version {version} not AVAILABLE after "
                    f"{timeout_s:g} s; last state {last['state']}"
                    + (f", error: {last['error']}" if last["error"] else "")
                    + ("" if self.protocol == "grpc" else
                       " (over REST, Serving must poll models.config: "
                       "--model_config_file_poll_wait_seconds)"))
            time.sleep(min(poll_s, max(timeout_s - waited, 0.0)))

    def _version_state(self, name: str, version: int) -> dict:
        """{state, error} of one version; NOT FOUND / UNREACHABLE stand for no answer."""
        try:
            found = [s for s in self.model_status(name, version) if s["version"] == version]
        except ServingNotFound as exc:
            return {"state": "NOT FOUND", "error": str(exc)}
        except ServingUnreachable as exc:
            return {"state": "UNREACHABLE", "error": str(exc)}
        return found[0] if found else {"state": "NOT FOUND", "error": None}

    def reload_config(self, config: ModelServerConfig) -> None:
        """Replace Serving's whole model config (gRPC only: REST has no such call)."""
        self._transport.reload_config(config)

    def predict(self, name: str, inputs: dict[str, np.ndarray], version: int | None = None,
                label: str | None = None, signature: str = SERVING_SIGNATURE
                ) -> dict[str, np.ndarray]:
        """Run `signature` of the model (a version, a label, or the newest) on `inputs`."""
        return self._transport.predict(name, inputs, version, label, signature)

    def close(self) -> None:
        self._transport.close()

    def __enter__(self) -> ServingClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- confirming a version ------------------------------------------------------------------


def _check_detections(outputs: dict[str, np.ndarray], where: str) -> int:
    missing = [key for key in DETECTION_OUTPUTS if key not in outputs]
    if missing:
        raise ServingError(f"{where}: answer lacks detection outputs {missing} "
                           f"(got {sorted(outputs)})")
    boxes = np.asarray(outputs["detection_boxes"])
    if boxes.ndim != 3 or boxes.shape[0] != 1 or boxes.shape[-1] != 4:
        raise ServingError(f"{where}: detection_boxes has shape {boxes.shape}, "
                           "expected [1, N, 4]")
    return int(np.asarray(outputs["num_detections"]).reshape(-1)[0])


def confirm_served(client: ServingClient, model_name: str, version: int,
                   saved_model_dir: str | os.PathLike, timeout_s: float) -> dict:
    """Wait until Serving has `version` AVAILABLE, then send it ONE request (the first warmup
    record of `saved_model_dir`) and check that detections come back.

    Returns {model_name, version, state, protocol, waited_s, latency_ms, num_outputs,
    detections}; raises TimeoutError / ServingError (see `wait_until_available`) otherwise.
    """
    status = client.wait_until_available(model_name, version, timeout_s)
    warmup = f"{os.fspath(saved_model_dir).rstrip('/')}/assets.extra/{WARMUP_FILE}"
    warmup_inputs = read_warmup(warmup) if storage.exists(warmup) else []
    if not warmup_inputs:
        raise FileNotFoundError(f"{warmup}: no warmup request to confirm version {version} with")
    start = time.perf_counter()
    outputs = client.predict(model_name, {INPUT_NAME: warmup_inputs[0]}, version=version)
    latency = time.perf_counter() - start
    detections = _check_detections(outputs, f"{client!r}: model {model_name!r} "
                                            f"version {version}")
    return {"model_name": model_name, "version": version, "state": status["state"],
            "protocol": client.protocol, "waited_s": status["waited_s"],
            "latency_ms": round(latency * 1000, 1), "num_outputs": len(outputs),
            "detections": detections}


def send_config(client: ServingClient, config_path: str | os.PathLike) -> bool:
    """Hand Serving the models.config at `config_path` now (gRPC); False over REST, where
    Serving reads the file at its next poll."""
    if client.protocol != "grpc":
        return False
    client.reload_config(serving_config.read(config_path))
    return True


def move_confirmed(move: Callable[..., dict], client: ServingClient | None,
                   serving_base: str | os.PathLike, model_name: str, version: int | None, *,
                   options: ServingOptions, log: Log | None = None, **kwargs: Any) -> dict:
    """Run a label move (`promote.promote` or `rollback.rollback`) with Serving in the loop.

    Between the move's two models.config writes, Serving gets the config (`send_config`) and
    `confirm_served` checks the target version answers; after the label write Serving gets
    the config again. Without a client it is just the move. Returns the move's result plus
    `serving`: the confirmation, or None if nothing was checked.
    """
    base = os.fspath(serving_base)
    config_path = options.models_config_path(base)
    confirmed: dict = {}
    log = log or (lambda message: None)

    def wait(target: int) -> None:
        sent = send_config(client, config_path)
        log(f"{client!r}: {'sent' if sent else 'Serving polls'} {config_path}; waiting up to "
            f"{options.wait_available_s:g} s for {model_name} version {target}")
        confirmed.update(confirm_served(client, model_name, target,
                                        f"{model_dir(base, model_name)}/{target}",
                                        options.wait_available_s))
        log(f"Serving answers with {model_name} version {target}: {confirmed}")

    if client is None:
        log("no TF Serving address configured: the label moves without a live check")
        return {**move(base, model_name, version, options=options, **kwargs), "serving": None}
    result = move(base, model_name, version, options=options, wait=wait, **kwargs)
    send_config(client, config_path)
    return {**result, "serving": confirmed or None}
