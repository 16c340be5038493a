"""A stand-in for `tensorflow_model_server`: real gRPC and REST servers on 127.0.0.1.

The Serving binary cannot run here, so this server speaks Serving's two wire protocols (the
generated `tensorflow_serving.apis` services over gRPC; `/v1/models/...` JSON over HTTP) and
behaves like Serving where our code depends on it:

- Models, version policies and labels come from a models.config (text `ModelServerConfig`),
  re-read whenever the file changes (as `--model_config_file_poll_wait_seconds` would);
  `HandleReloadConfigRequest` replaces the config until the file changes again.
- Versions are the numeric child folders of a model's base_path. A served version is LOADING
  for `load_delay_s` and while `tf.saved_model.load(..., tags=["serve"])` and the replay of
  its warmup requests run in the background, then AVAILABLE, or END with the load error. A
  version no longer served is END.
- GetModelStatus ignores labels (as Serving does); Predict takes a version, a label or the
  newest AVAILABLE version and runs the requested signature of the loaded SavedModel.
- REST predictions come in either of Serving's formats: columnar (`inputs` -> `outputs`) or
  row (`instances` -> `predictions`, one object per instance; an instance of a signature with
  one input is that input's value, e.g. `{"b64": ...}`).

The JSON codec below is Serving's side of the REST format, written independently of the
client's on purpose: the tests check that the two sides agree.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable

import grpc
import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import (
    get_model_status_pb2,
    model_management_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
    status_pb2,
)
from tensorflow_serving.config import model_server_config_pb2

from odapi_operators.core.model.saved_model import INPUT_NAME, WARMUP_FILE, read_warmup
from odapi_operators.core.serving import models_config as serving_config

_UNKNOWN = 2  # tensorflow.error.Code.UNKNOWN
_LOADED: dict[str, Any] = {}  # SavedModels by content: one export pushed twice loads once
_LOADING = threading.Lock()
_HTTP = {grpc.StatusCode.NOT_FOUND: 404, grpc.StatusCode.INVALID_ARGUMENT: 400}
_REST_PATH = re.compile(r"^/v1/models/(?P<name>[^/:]+)(?:/versions/(?P<version>\d+)|"
                        r"/labels/(?P<label>[^/:]+))?(?P<predict>:predict)?$")


class ServingFault(Exception):
    """An error answer: a gRPC status code and Serving's message."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


@dataclass
class _Servable:
    """One loaded (or loading) version."""

    ready_at: float
    model: Any = None
    error: str | None = None
    unloaded: bool = False
    loaded: threading.Event = field(default_factory=threading.Event)

    def state(self) -> tuple[str, str | None]:
        if self.unloaded:
            return "END", None
        if not self.loaded.is_set() or time.monotonic() < self.ready_at:
            return "LOADING", None
        return ("END", self.error) if self.error else ("AVAILABLE", None)


class ServingStandin:
    """Serve the models of `models_config` over gRPC (`grpc_address`) and REST (`rest_url`).

    Records what clients did: `reloads` (configs received) and `predictions` ((model,
    version) answered). Faults a test can inject per version, as a slow or broken version
    would behave: `answer_delay_s` (seconds added to each answer), `box_shift` (added to every
    detection box coordinate: an export that misplaces its boxes).
    """

    def __init__(self, models_config: Path, load_delay_s: float = 0.0) -> None:
        self.models_config = Path(models_config)
        self.load_delay_s = load_delay_s
        self.reloads: list[model_server_config_pb2.ModelServerConfig] = []
        self.predictions: list[tuple[str, int]] = []
        self.answer_delay_s: dict[int, float] = {}
        self.box_shift: dict[int, float] = {}
        self._config = model_server_config_pb2.ModelServerConfig()
        self._config_text: str | None = None
        self._servables: dict[str, dict[int, _Servable]] = {}
        self._lock = threading.Lock()
        self._grpc: grpc.Server | None = None
        self._http: ThreadingHTTPServer | None = None

    # --- lifecycle --------------------------------------------------------------------

    def start(self) -> ServingStandin:
        self._grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        model_service_pb2_grpc.add_ModelServiceServicer_to_server(_ModelService(self),
                                                                  self._grpc)
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
            _PredictionService(self), self._grpc)
        self.grpc_port = self._grpc.add_insecure_port("127.0.0.1:0")
        self._grpc.start()
        self._http = ThreadingHTTPServer(("127.0.0.1", 0), _rest_handler(self))
        threading.Thread(target=self._http.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._grpc is not None:
            self._grpc.stop(grace=None)
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()

    def __enter__(self) -> ServingStandin:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def grpc_address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def rest_url(self) -> str:
        return f"http://127.0.0.1:{self._http.server_address[1]}"

    # --- what Serving knows -----------------------------------------------------------

    def _current_config(self) -> model_server_config_pb2.ModelServerConfig:
        text = self.models_config.read_text() if self.models_config.exists() else ""
        if text != self._config_text:  # the poll: a changed file wins over a reload
            self._config, self._config_text = serving_config.parse(text), text
        return self._config

    def reload(self, config: model_server_config_pb2.ModelServerConfig) -> None:
        with self._lock:
            self._current_config()
            self.reloads.append(config)
            self._config = config

    def _load(self, path: Path) -> _Servable:
        servable = _Servable(ready_at=time.monotonic() + self.load_delay_s)

        def load() -> None:
            try:
                servable.model = _load_saved_model(path)
            except Exception as exc:  # Serving reports any load failure as END + error
                servable.error = f"Failed to load {path}: {str(exc)[:300]}"
            servable.loaded.set()

        threading.Thread(target=load, daemon=True).start()
        return servable

    def _refresh(self, name: str) -> tuple[Any, dict[int, _Servable]]:
        """Apply the config and the version folders to `name`'s servables, like a poll."""
        with self._lock:
            entry = serving_config.entry(self._current_config(), name)
            if entry is None:
                raise ServingFault(grpc.StatusCode.NOT_FOUND,
                                   f"Could not find any versions of model {name}")
            base = Path(entry.base_path)
            numeric = sorted(int(p.name) for p in base.iterdir()
                             if p.is_dir() and p.name.isdigit()) if base.is_dir() else []
            wanted = set(serving_config.served(entry, numeric))
            servables = self._servables.setdefault(name, {})
            for version in wanted:
                if version not in servables or servables[version].unloaded:
                    servables[version] = self._load(base / str(version))
            for version, servable in servables.items():
                if version not in wanted and not servable.unloaded:
                    servable.unloaded, servable.model = True, None
            return entry, dict(servables)

    def status(self, name: str, version: int | None) -> list[tuple[int, str, str | None]]:
        _, servables = self._refresh(name)
        if version is not None:
            if version not in servables:
                raise ServingFault(grpc.StatusCode.NOT_FOUND,
                                   f"Could not find version {version} of model {name}")
            servables = {version: servables[version]}
        if not servables:
            raise ServingFault(grpc.StatusCode.NOT_FOUND,
                               f"Could not find any versions of model {name}")
        return [(v, *s.state()) for v, s in sorted(servables.items())]

    def predict(self, name: str, version: int | None, label: str | None, signature: str,
                inputs: dict[str, np.ndarray] | np.ndarray) -> dict[str, np.ndarray]:
        """Run `signature`; `inputs` by name, or one array for a signature's only input."""
        entry, servables = self._refresh(name)
        if label:
            version = serving_config.labels(entry).get(label)
            if version is None:
                raise ServingFault(grpc.StatusCode.NOT_FOUND,
                                   f"Unrecognized servable version label: {label}")
        if version is None:
            ready = [v for v, s in servables.items() if s.state()[0] == "AVAILABLE"]
            version = max(ready, default=None)
        servable = servables.get(version)
        if servable is None or servable.state()[0] != "AVAILABLE":
            raise ServingFault(grpc.StatusCode.NOT_FOUND,
                               f"Servable not found for request: Specific({name}, {version})")
        function = servable.model.signatures.get(signature or "serving_default")
        if function is None:
            raise ServingFault(grpc.StatusCode.INVALID_ARGUMENT,
                               f'Serving signature name: "{signature}" not found')
        specs = function.structured_input_signature[1]
        if not isinstance(inputs, dict):
            if len(specs) != 1:
                raise ServingFault(grpc.StatusCode.INVALID_ARGUMENT,
                                   f"instances must name the inputs {sorted(specs)}")
            inputs = {next(iter(specs)): inputs}
        try:
            tensors = {key: _tensor(inputs[key], spec.dtype) for key, spec in specs.items()}
        except KeyError as exc:
            raise ServingFault(grpc.StatusCode.INVALID_ARGUMENT,
                               f"input {exc} missing (signature takes {sorted(specs)})") from None
        outputs = {key: value.numpy() for key, value in function(**tensors).items()}
        self.predictions.append((name, version))
        time.sleep(self.answer_delay_s.get(version, 0.0))
        if version in self.box_shift and "detection_boxes" in outputs:
            outputs["detection_boxes"] = outputs["detection_boxes"] + self.box_shift[version]
        return outputs


def _load_saved_model(path: Path) -> Any:
    """`tf.saved_model.load` with the `serve` tag, once per graph + variables content (a
    test-speed shortcut: loading takes seconds, and the tests push one export repeatedly)."""
    files = [path / "saved_model.pb", *sorted((path / "variables").glob("*"))]
    key = hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()
    with _LOADING:
        if key not in _LOADED:
            model = tf.saved_model.load(str(path), tags=["serve"])
            _replay_warmup(model, path)
            _LOADED[key] = model
        return _LOADED[key]


def _replay_warmup(model: Any, path: Path) -> None:
    """Run the version's warmup requests once before it counts as loaded, as Serving does
    (the first call of a restored graph is slow)."""
    warmup = path / "assets.extra" / WARMUP_FILE
    if warmup.exists():
        signature = model.signatures["serving_default"]
        specs = signature.structured_input_signature[1]
        for array in read_warmup(warmup):
            signature(**{INPUT_NAME: _tensor(array, specs[INPUT_NAME].dtype)})


def _tensor(array: np.ndarray, dtype: tf.DType) -> tf.Tensor:
    if dtype == tf.string:
        return tf.constant(array, dtype=tf.string)
    return tf.constant(np.asarray(array).astype(dtype.as_numpy_dtype))


# --- gRPC --------------------------------------------------------------------------------


def _answering(method: Callable) -> Callable:
    """Turn a ServingFault into the gRPC status Serving would send."""

    def handler(self, request, context):
        try:
            return method(self, request, context)
        except ServingFault as fault:
            context.abort(fault.code, fault.message)

    return handler


class _ModelService(model_service_pb2_grpc.ModelServiceServicer):
    def __init__(self, standin: ServingStandin) -> None:
        self.standin = standin

    @_answering
    def GetModelStatus(self, request, context):
        spec = request.model_spec
        version = spec.version.value if spec.HasField("version") else None
        pb = get_model_status_pb2
        return pb.GetModelStatusResponse(model_version_status=[
            pb.ModelVersionStatus(version=v, state=pb.ModelVersionStatus.State.Value(state),
                                  status=status_pb2.StatusProto(
                                      error_code=_UNKNOWN if error else 0,
                                      error_message=error or ""))
            for v, state, error in self.standin.status(spec.name, version)])

    @_answering
    def HandleReloadConfigRequest(self, request, context):
        self.standin.reload(request.config)
        return model_management_pb2.ReloadConfigResponse(status=status_pb2.StatusProto())


class _PredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):
    def __init__(self, standin: ServingStandin) -> None:
        self.standin = standin

    @_answering
    def Predict(self, request, context):
        spec = request.model_spec
        choice = spec.WhichOneof("version_choice")
        outputs = self.standin.predict(
            spec.name, spec.version.value if choice == "version" else None,
            spec.version_label if choice == "version_label" else None, spec.signature_name,
            {key: tf.make_ndarray(proto) for key, proto in request.inputs.items()})
        response = predict_pb2.PredictResponse()
        for key, array in outputs.items():
            response.outputs[key].CopyFrom(tf.make_tensor_proto(array))
        return response


# --- REST --------------------------------------------------------------------------------


def _from_json(value: Any) -> Any:
    if isinstance(value, dict):
        return base64.b64decode(value["b64"])
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    return value


def _to_json(array: np.ndarray) -> Any:
    if array.dtype == object:
        return [_to_json(a) for a in array] if array.ndim else {
            "b64": base64.b64encode(array.item()).decode()}
    return array.tolist()


def _rest_handler(standin: ServingStandin) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self._answer(post=False)

        def do_POST(self) -> None:
            self._answer(post=True)

        def _answer(self, post: bool) -> None:
            match = _REST_PATH.match(self.path)
            try:
                if match is None or bool(match["predict"]) != post:
                    raise ServingFault(grpc.StatusCode.INVALID_ARGUMENT,
                                       f"Malformed request: {self.command} {self.path}")
                body, code = (self._predict if post else self._status)(match), 200
            except ServingFault as fault:
                body, code = {"error": fault.message}, _HTTP.get(fault.code, 500)
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _status(self, match: re.Match) -> dict:
            version = int(match["version"]) if match["version"] else None
            return {"model_version_status": [
                {"version": str(v), "state": state,
                 "status": {"error_code": "UNKNOWN" if error else "OK",
                            "error_message": error or ""}}
                for v, state, error in standin.status(match["name"], version)]}

        def _predict(self, match: re.Match) -> dict:
            request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            rows = request.get("instances")
            if rows is None:
                inputs = {key: _array(value) for key, value in request["inputs"].items()}
            elif rows and isinstance(rows[0], dict) and set(rows[0]) != {"b64"}:
                inputs = {key: _array([row[key] for row in rows]) for key in rows[0]}
            else:  # the signature's only input
                inputs = _array(rows)
            outputs = standin.predict(
                match["name"], int(match["version"]) if match["version"] else None,
                match["label"], request.get("signature_name", ""), inputs)
            if rows is None:
                return {"outputs": {key: _to_json(array) for key, array in outputs.items()}}
            count = len(next(iter(outputs.values())))
            return {"predictions": [
                {key: _to_json(np.asarray(array[index], dtype=array.dtype))
                 for key, array in outputs.items()} for index in range(count)]}

        def log_message(self, *args: Any) -> None:
            pass

    return Handler


def _array(value: Any) -> np.ndarray:
    return np.array(_from_json(value), dtype=object) if _has_bytes(value) else np.asarray(value)


def _has_bytes(value: Any) -> bool:
    while isinstance(value, list) and value:
        value = value[0]
    return isinstance(value, dict)
