"""TF Serving's `models.config`: which versions of a model are loaded and where labels point.

Read and written with the real `tensorflow_serving.config` protos (which do not import
TensorFlow), so what we write is exactly what `--model_config_file` accepts. Serving only lets
a label point at a version it has already loaded, so a label moves in two writes: first the
version policy is widened to serve the target version too (`serve`), then, once Serving has
loaded it, the label moves (`set_label`). Entries of other models are left untouched.

Each write is atomic (temp file + rename locally; a generation-checked object write on gs://)
and read-modify-write cycles are serialized (a lock file locally, generation preconditions on
object stores), so concurrent pushes of different models sharing one file lose no update.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Callable, Literal

from google.protobuf import text_format
from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from pydantic_core import PydanticCustomError
from tensorflow_serving.config import model_server_config_pb2 as pb

from odapi_operators.core import storage, testpoints
from odapi_operators.core.failures import Failure

STABLE, CANARY = "stable", "canary"
_LABEL = re.compile(r"^[A-Za-z0-9_]+$")
_MODEL_NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]*$")  # one folder: no '/', '.', '..'
PLAIN_NAME = "a plain name (letters, digits, '_', '-', '.'; no '/', not '.' or '..')"
_GS_RETRIES = 10

VersionPolicy = Literal["labelled", "latest", "all"]


class ServingConfigError(ValueError):
    """models.config cannot be read, or a requested change would break what Serving serves."""
    failure = Failure.CONFIG


def plain_model_name(name: str) -> str:
    """`name`, if it is one folder under the serving base (the model's folder there is
    `<base>/<name>`: a path would write outside it)."""
    if not _MODEL_NAME.match(name):
        raise ServingConfigError(f"model name {name!r}: must be {PLAIN_NAME}")
    return name


def _plain_name_field(name: str) -> str:
    if not _MODEL_NAME.match(name):
        raise PydanticCustomError("plain_name", PLAIN_NAME)
    return name


ModelName = Annotated[str, AfterValidator(_plain_name_field)]  # a config field's type


def _is_absolute(path: str) -> bool:
    return "://" in path or os.path.isabs(path)


def _absolute_field(path: str | None) -> str | None:
    """Serving would resolve a relative path against its own working directory."""
    if path is not None and not _is_absolute(path):
        raise PydanticCustomError("absolute_path", "must be absolute (the path the Serving "
                                  "process sees, e.g. /models)")
    return path


AbsolutePath = Annotated[str | None, AfterValidator(_absolute_field)]  # or None


class ServingOptions(BaseModel):
    """Extra keys of the `serving:` section for promotion (defaults live under `serving.base`).

    `version_policy`: `labelled` writes `specific {versions}` = the versions labels point at,
    plus a version being moved in (default: Serving loads exactly what is addressable);
    `latest` writes `latest {num_versions: latest_versions}`; `all` loads every version.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    models_config: str | None = Field(default=None, description="the file TF Serving reads "
                                      "as --model_config_file (default: <base>/models.config)")
    registry: str | None = Field(default=None, description="the registry of candidates and "
                                 "label moves (default: <base>/registry.jsonl)")
    base_in_serving: AbsolutePath = Field(default=None, description="`base` as the Serving "
                                          "process sees it, absolute (docker: /models)")
    keep_versions: int = Field(default=5, ge=1, description="newest versions kept on disk "
                               "(labelled and served ones are kept too)")
    version_policy: VersionPolicy = Field(default="labelled", description="which versions "
                                          "Serving loads: labelled, latest or all")
    latest_versions: int = Field(default=2, ge=1, description="how many newest versions "
                                 "Serving loads under version_policy latest")
    # A running Serving to confirm a version with before a label moves (serving_client.py);
    # none: the label moves unchecked (an Airflow `tf_serving_default` connection also works).
    grpc_address: str | None = Field(default=None, description="a running TF Serving's gRPC "
                                     "host:port (8500) to confirm a version before a label "
                                     "moves; preferred over REST")
    rest_url: str | None = Field(default=None, description="a running TF Serving's REST URL "
                                 "(http://host:8501), if no gRPC address")
    wait_available_s: float = Field(default=300, gt=0, description="seconds to wait for Serving "
                                    "to load a version before its label moves")

    def models_config_path(self, base: str) -> str:
        return self.models_config or _join(base, "models.config")

    def registry_path(self, base: str) -> str:
        return self.registry or _join(base, "registry.jsonl")

    def model_base_path(self, base: str, model_name: str) -> str:
        """The `base_path` Serving gets: absolute, since Serving does not share our cwd."""
        if self.base_in_serving:
            return _join(self.base_in_serving, model_name)
        return _join(base if _is_absolute(base) else os.path.abspath(base), model_name)


def _join(base: str | os.PathLike, *parts: str) -> str:
    return "/".join([os.fspath(base).rstrip("/"), *parts])


# --- the proto ---------------------------------------------------------------------------


def parse(text: str, source: str = "models.config") -> pb.ModelServerConfig:
    config = pb.ModelServerConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as exc:
        raise ServingConfigError(f"{source}: not a text-format ModelServerConfig: {exc}") from None
    if config.WhichOneof("config") == "custom_model_config":
        raise ServingConfigError(f"{source}: custom_model_config is not supported")
    return config


def render(config: pb.ModelServerConfig) -> str:
    return text_format.MessageToString(config)


def entry(config: pb.ModelServerConfig, name: str) -> pb.ModelConfig | None:
    for model in config.model_config_list.config:
        if model.name == name:
            return model
    return None


def ensure_entry(config: pb.ModelServerConfig, name: str, base_path: str) -> pb.ModelConfig:
    """The entry for `name`, created (platform tensorflow) if absent; base_path kept current."""
    model = entry(config, name)
    if model is None:
        model = config.model_config_list.config.add()
        model.name = name
        model.model_platform = "tensorflow"
    model.base_path = base_path
    return model


def labels(model: pb.ModelConfig | None) -> dict[str, int]:
    return dict(model.version_labels) if model is not None else {}


def policy_kind(model: pb.ModelConfig) -> str:
    """`latest` (also Serving's default when no policy is set), `all` or `specific`."""
    return model.model_version_policy.WhichOneof("policy_choice") or "latest"


def current_policy(model: pb.ModelConfig | None,
                   default: ServingOptions | None = None) -> ServingOptions:
    """Options whose policy matches what the file already says (for tools with no pipeline
    config, e.g. `odapi rollback`, which must not rewrite a `latest` policy as `labelled`)."""
    options = default or ServingOptions()
    if model is None:
        return options
    kind = policy_kind(model)
    if kind == "specific":
        return options.model_copy(update={"version_policy": "labelled"})
    if kind == "all":
        return options.model_copy(update={"version_policy": "all"})
    count = model.model_version_policy.latest.num_versions or 1
    return options.model_copy(update={"version_policy": "latest", "latest_versions": count})


def served(model: pb.ModelConfig, available: list[int]) -> list[int]:
    """The versions Serving loads for `model`, given the complete version directories."""
    kind = policy_kind(model)
    if kind == "all":
        return sorted(available)
    if kind == "specific":
        wanted = set(model.model_version_policy.specific.versions)
        return sorted(v for v in available if v in wanted)
    count = model.model_version_policy.latest.num_versions or 1
    return sorted(available)[-count:]


def referenced(model: pb.ModelConfig | None) -> set[int]:
    """Versions the entry names explicitly (labels, specific list): never garbage-collect them."""
    if model is None:
        return set()
    names = set(labels(model).values())
    if policy_kind(model) == "specific":
        names |= set(model.model_version_policy.specific.versions)
    return names


def _labelled(model: pb.ModelConfig, available: list[int]) -> set[int]:
    return {v for v in labels(model).values() if v in available}  # a deleted one can't be


def _set_policy(model: pb.ModelConfig, keep: set[int], policy: VersionPolicy,
                latest_versions: int) -> None:
    """Write `policy` into the entry; `keep` is the `specific` list under `labelled`."""
    choice = model.model_version_policy
    if policy == "all":
        choice.all.SetInParent()
    elif policy == "latest":
        choice.latest.num_versions = latest_versions
    else:
        del choice.specific.versions[:]
        choice.specific.versions.extend(sorted(keep))


def serve(model: pb.ModelConfig, version: int, available: list[int],
          policy: VersionPolicy = "labelled", latest_versions: int = 2) -> None:
    """Step 1 of a label move: make the policy load `version` without dropping labelled ones."""
    if version not in available:
        raise ServingConfigError(f"{model.base_path}/{version}: not a complete version "
                                 "(no saved_model.pb)")
    _set_policy(model, _labelled(model, available) | {version}, policy, latest_versions)
    loaded = served(model, available)
    missing = sorted(({version} | _labelled(model, available)) - set(loaded))
    if missing:
        raise ServingConfigError(
            f"{model.name}: version_policy {policy} would not serve version(s) {missing} "
            f"(loaded: {loaded}); labels may only point at loaded versions")


def make_room(model: pb.ModelConfig, available: list[int], policy: VersionPolicy = "labelled",
              latest_versions: int = 2) -> bool:
    """Before a push makes a new, highest version appear on disk: refuse if `policy` would then
    stop serving a labelled version, and set `policy` now (return True: write it first) if the
    entry's current one would. Under `latest` Serving loads the newest versions it finds in
    the directory by itself, so once the version is there it is too late to check."""
    incoming = max(available, default=0) + 1  # stands for the new one: the highest, whatever N
    after = [*available, incoming]
    planned = pb.ModelConfig()
    planned.CopyFrom(model)
    _set_policy(planned, _labelled(model, available) | {incoming}, policy, latest_versions)
    loaded = served(planned, after)
    dropped = {label: v for label, v in labels(model).items() if v in available
               and v not in loaded}
    if dropped:
        names = ", ".join(f"{label} {v}" for label, v in sorted(dropped.items()))
        setting = f" with serving.latest_versions {latest_versions}" if policy == "latest" else ""
        raise ServingConfigError(
            f"{model.name}: serving.version_policy {policy}{setting} would stop serving {names} "
            f"as soon as a new version appears (Serving would load {loaded[:-1]} and the new "
            "one); nothing was pushed. Raise serving.latest_versions, use version_policy "
            "labelled, or move the label forward first")
    if _labelled(model, available) - set(served(model, after)):
        _set_policy(model, _labelled(model, available), policy, latest_versions)
        return True
    return False


def set_label(model: pb.ModelConfig, label: str, version: int, available: list[int]) -> None:
    """Step 2 of a label move: point `label` at a version the policy already serves."""
    if not _LABEL.match(label):
        raise ServingConfigError(f"label {label!r}: only [A-Za-z0-9_] allowed")
    if version not in served(model, available):
        raise ServingConfigError(f"{model.name}: cannot label version {version} {label!r}: "
                                 "it is not served yet (write step 1 first)")
    model.version_labels[label] = version


def remove_label(model: pb.ModelConfig, label: str) -> int | None:
    """Drop `label` (e.g. a canary's); under a `specific` policy its version is no longer
    loaded unless another label points at it. Returns the version it pointed at."""
    version = labels(model).get(label)
    if version is None:
        return None
    del model.version_labels[label]
    if policy_kind(model) == "specific" and version not in labels(model).values():
        kept = [v for v in model.model_version_policy.specific.versions if v != version]
        del model.model_version_policy.specific.versions[:]
        model.model_version_policy.specific.versions.extend(kept)
    return version


# --- the file ----------------------------------------------------------------------------


def read(path: str | os.PathLike) -> pb.ModelServerConfig:
    """The config at `path`; an empty one if the file does not exist yet."""
    if not storage.exists(path):
        return pb.ModelServerConfig()
    return parse(storage.read_text(path), os.fspath(path))


def _write_local(path: Path, text: str) -> None:
    for stale in path.parent.glob(f".tmp-{path.name}-*"):  # from a writer killed mid-write
        stale.unlink(missing_ok=True)
    with storage.atomic_write(path, "w") as fh:
        half = len(text) // 2
        fh.write(text[:half])
        fh.flush()
        testpoints.reached("models_config:writing")
        fh.write(text[half:])


def update(path: str | os.PathLike,
           change: Callable[[pb.ModelServerConfig], None]) -> pb.ModelServerConfig:
    """Read, apply `change`, write back atomically; serialized against other writers.

    `change` may run more than once on object stores (after losing a race) and must only
    depend on the config it is given.
    """
    if storage.is_local(path):
        local = Path(path)
        with storage.file_lock(local):
            config = read(local)
            change(config)
            _write_local(local, render(config))
            return config
    for _ in range(_GS_RETRIES):
        try:
            generation = storage.stat(path).generation
        except FileNotFoundError:
            generation = 0
        config = parse(storage.read_text(path), os.fspath(path)) if generation else \
            pb.ModelServerConfig()
        change(config)
        try:
            storage.write_bytes_if_generation(path, render(config).encode(), generation)
            return config
        except storage.PreconditionFailed:
            continue
    raise ServingConfigError(f"{os.fspath(path)}: still changing under us after "
                             f"{_GS_RETRIES} attempts")


def move_label(path: str | os.PathLike, name: str, base_path: str, label: str, version: int,
               available: list[int], *, policy: VersionPolicy = "labelled",
               latest_versions: int = 2,
               wait: Callable[[int], None] | None = None) -> dict[str, int]:
    """Point `label` of model `name` at `version` in the two writes Serving requires.

    Between the writes, `wait(version)` (e.g. the Serving hook waiting for AVAILABLE) runs
    without any lock held. Returns the labels after the move.
    """
    update(path, lambda c: serve(ensure_entry(c, name, base_path), version, available,
                                 policy, latest_versions))
    testpoints.reached("models_config:between_steps")
    if wait is not None:
        wait(version)
    config = update(path, lambda c: set_label(ensure_entry(c, name, base_path), label, version,
                                              available))
    return labels(entry(config, name))
