"""Which model proposes boxes, and one `predict(images)` over a local model or TF Serving.

A model is named by a folder or a URL (`resolve_model`):

- `<serving base>/<model>`: the production version (`serving_dir.production_version`: `stable`,
  else the newest), loaded locally from its version folder;
- a version folder, SavedModel or export folder; or a training model dir (its newest
  checkpoint; a candidate, not yet exported);
- `grpc://host:8500/<model>[/versions/N|/labels/L]` or
  `http://host:8501/v1/models/<model>[/versions/N|/labels/L]`: TF Serving answers. The pushed
  model folder (`serving_dir`, e.g. `<base>/<model>`) says which version to ask for, its
  label map and input type; without it give a label map, and the newest AVAILABLE version
  is asked for by number, through its `image_bytes` signature.

Either way a batch of encoded images goes in one call (`detector.image_batches`) and comes
back as per-image normalized `Detections` (`detector.unbatch`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit

from odapi_operators.core import storage
from odapi_operators.core.data.label_map import read_label_map
from odapi_operators.core.serving import serving_dir

SERVING_SCHEMES = ("grpc", "http", "https")
SERVING_TIMEOUT_S = 300.0  # a batch on a loaded CPU Serving can take a while


@dataclass(frozen=True)
class ModelRef:
    """A model resolved to what inference needs; `version` None: not a Serving version."""

    name: str
    version: int | None = None
    path: str | None = None        # local model folder (None: only Serving has it)
    serving: str | None = None     # grpc://host:port or http(s)://host:port
    label: str | None = None       # a Serving version label to ask for (no version known)
    label_map: str | None = None
    input_type: str | None = None  # image_bytes | image_tensor | tf_example
    normalized: bool | None = None

    @property
    def model_version(self) -> str:
        """What annotation tasks record as the proposing model: `<name>/<version>`."""
        if self.version is not None:
            return f"{self.name}/{self.version}"
        return f"{self.name}:{self.label}" if self.label else self.name

    def labels(self) -> dict[int, str]:
        """Class id -> name, from the label map ({} without one)."""
        if not self.label_map:
            return {}
        return {item_id: name for name, item_id in read_label_map(self.label_map).items()}


class Predictor(Protocol):
    ref: ModelRef

    def predict(self, images: list[bytes]) -> list: ...  # list[detector.Detections]

    def close(self) -> None: ...


def is_serving_url(spec: str) -> bool:
    return urlsplit(spec).scheme in SERVING_SCHEMES


def _folder_ref(path: str) -> ModelRef:
    """A model from a local folder: a Serving model dir, version, SavedModel or model dir."""
    from odapi_operators.core.model.detector import saved_model_dir, saved_model_info
    from odapi_operators.core.model.saved_model import EXPORT_INFO

    folder = Path(path)
    saved = saved_model_dir(folder)
    if saved is None and serving_dir.versions(path):  # <base>/<model>: the production version
        version = serving_dir.production_version(str(folder.parent), folder.name)
        saved, folder = folder / str(version), folder / str(version)
    if saved is None:
        from odapi_operators.core.model.tfvision import TRAIN_INFO

        if not (folder / TRAIN_INFO).is_file():
            raise FileNotFoundError(f"{path}: not a Serving model dir, version folder, "
                                    "SavedModel or training model dir")
        return ModelRef(name=folder.resolve().name, path=str(folder))
    input_type, normalized = saved_model_info(saved)
    label_map = saved / "assets.extra" / "label_map.pbtxt"
    version = int(folder.name) if folder.name.isdigit() else None
    if version is not None:
        name = folder.resolve().parent.name
    else:  # an export: the model name it was exported for
        info = saved / "assets.extra" / EXPORT_INFO
        name = (json.loads(storage.read_text(info)).get("model_name") if info.is_file()
                else None) or folder.resolve().name
    return ModelRef(name=name, version=version, path=str(saved),
                    label_map=str(label_map) if label_map.is_file() else None,
                    input_type=input_type, normalized=normalized)


def _parse_serving_url(url: str) -> tuple[str, str, int | None, str | None]:
    """(address, model name, version, label) from a Serving URL naming a model."""
    parts = urlsplit(url)
    segments = [s for s in parts.path.split("/") if s]
    if segments[:2] == ["v1", "models"]:
        segments = segments[2:]
    if not segments:
        raise ValueError(f"{url}: name the model, e.g. grpc://host:8500/MODEL or "
                         "http://host:8501/v1/models/MODEL")
    name, rest = segments[0], segments[1:]
    version = label = None
    if len(rest) == 2 and rest[0] == "versions" and rest[1].isdigit():
        version = int(rest[1])
    elif len(rest) == 2 and rest[0] == "labels":
        label = rest[1]
    elif rest:
        raise ValueError(f"{url}: expected .../MODEL[/versions/N|/labels/L]")
    return f"{parts.scheme}://{parts.netloc}", name, version, label


def resolve_model(spec: str, serving_dir: str | None = None,
                  label_map: str | None = None) -> ModelRef:
    """The model `spec` names (folder or Serving URL; see the module docstring)."""
    if not is_serving_url(spec):
        ref = _folder_ref(os.fspath(spec))
        return replace(ref, label_map=label_map or ref.label_map)
    address, name, version, label = _parse_serving_url(spec)
    ref = ModelRef(name=name, serving=address, version=version, label=label)
    if serving_dir:
        local = _folder_ref(serving_dir)
        ref = replace(local, name=name, serving=address, path=None,
                      version=version if version is not None or label else local.version,
                      label=label)
    return replace(ref, label_map=label_map or ref.label_map)


class LocalPredictor:
    """The model loaded in this process (core/detector)."""

    def __init__(self, ref: ModelRef) -> None:
        from odapi_operators.core.model.detector import load_detector

        self.ref = ref
        self.detector = load_detector(ref.path)
        if ref.input_type is None:
            self.ref = replace(ref, input_type=self.detector.input_type)

    def predict(self, images: list[bytes]) -> list:
        return self.detector.detect_images(images)

    def close(self) -> None:
        self.detector = None


class ServingPredictor:
    """TF Serving answers, over gRPC or REST (core/serving_client), for one fixed version."""

    def __init__(self, ref: ModelRef, timeout: float = SERVING_TIMEOUT_S,
                 wait_s: float = SERVING_TIMEOUT_S) -> None:
        from odapi_operators.core.serving.client import ServingClient

        address = ref.serving or ""
        grpc = address.startswith("grpc://")
        self.client = ServingClient(grpc_address=address[len("grpc://"):] if grpc else None,
                                    rest_url=None if grpc else address, timeout=timeout)
        if ref.version is None and ref.label is None:  # pin the newest AVAILABLE version
            available = [s["version"] for s in self.client.model_status(ref.name)
                         if s["state"] == "AVAILABLE"]
            if not available:
                raise RuntimeError(f"{self.client!r}: no AVAILABLE version of {ref.name}")
            ref = replace(ref, version=max(available))
        elif ref.version is not None:  # just pushed: Serving may still be loading it
            self.client.wait_until_available(ref.name, ref.version, wait_s)
        self.ref = ref

    def predict(self, images: list[bytes]) -> list:
        from odapi_operators.core.model.detector import image_batches, unbatch
        from odapi_operators.core.model.saved_model import (
            BYTES_SIGNATURE,
            INPUT_NAME,
            SERVING_SIGNATURE,
        )

        # Input type unknown (no pushed model folder): every export answers `image_bytes`.
        input_type = self.ref.input_type or "image_bytes"
        signature = SERVING_SIGNATURE if self.ref.input_type else BYTES_SIGNATURE
        results: list = [None] * len(images)
        for indices, array in image_batches(images, input_type):
            outputs = self.client.predict(self.ref.name, {INPUT_NAME: array},
                                          version=self.ref.version, label=self.ref.label,
                                          signature=signature)
            for index, found in zip(indices, unbatch(outputs, self.ref.normalized)):
                results[index] = found
        return results

    def close(self) -> None:
        self.client.close()


def open_predictor(ref: ModelRef) -> Predictor:
    """A predictor for `ref`: TF Serving when it names a server, else the local model."""
    if ref.serving:
        return ServingPredictor(ref)
    if ref.path is None or not storage.exists(ref.path):
        raise FileNotFoundError(f"{ref.path}: model folder not found")
    return LocalPredictor(ref)
