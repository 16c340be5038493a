"""Label Studio in the loop: a project from a label map, tasks in, exports out, over REST.

    label_map.pbtxt --labeling_config--> project (RectangleLabels)
    preannotate's tasks.json --push_tasks--> project tasks with predictions (model_version)
    annotators submit in Label Studio
    project --pull_export--> <out>/<export>.json + labelstudio.json + _SUCCESS  (an export
                              folder the pipeline ingests like any other)

Plain `requests`, not label-studio-sdk: the SDK (2.1.x) requires opencv-python-headless<4.13,
which our pinned set (5.0) cannot take, and the five calls below need nothing of it.
A token is a legacy API token (sent as `Token <key>`) or a personal access token (a JWT
refresh token, exchanged at `/api/token/refresh` for an access token, sent as `Bearer`).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from xml.sax.saxutils import quoteattr

import requests

from odapi_operators.core import storage
from odapi_operators.core.data.label_map import read_label_map
from odapi_operators.core.failures import Failure
from odapi_operators.core.labeling.annotation_tasks import TASK_FILES

URL_ENV = "LABEL_STUDIO_URL"
API_KEY_ENV = "LABEL_STUDIO_API_KEY"
EXPORT_TYPES = ("JSON", "JSON_MIN")
PULL_FILE = "labelstudio.json"  # what was pulled, from where, and the annotation state
SCHEME = "labelstudio://"


class LabelStudioError(RuntimeError):
    """A refused or failed call; `failure` says whether retrying can help."""

    def __init__(self, message: str, failure: Failure = Failure.TRANSIENT) -> None:
        super().__init__(message)
        self.failure = failure


@dataclass(frozen=True)
class Address:
    """Where a Label Studio is and the token to use there."""

    url: str
    api_key: str


def labeling_config(label_map: dict[str, int], from_name: str = "label",
                    to_name: str = "image") -> str:
    """A RectangleLabels labeling config with the label map's classes in id order; its tag
    names match what `annotation_tasks.labelstudio_task` writes in predictions."""
    if not label_map:
        raise LabelStudioError("empty label map: a project needs at least one class",
                               Failure.CONFIG)
    labels = "".join(f"    <Label value={quoteattr(name)}/>\n"
                     for name, _ in sorted(label_map.items(), key=lambda kv: kv[1]))
    return (f"<View>\n  <Image name={quoteattr(to_name)} value=\"$image\"/>\n"
            f"  <RectangleLabels name={quoteattr(from_name)} toName={quoteattr(to_name)}>\n"
            f"{labels}  </RectangleLabels>\n</View>\n")


class LabelStudioClient:
    """The few REST calls odapi makes; every error names the URL and what Label Studio said."""

    def __init__(self, address: Address, timeout: float = 60) -> None:
        self.url = address.url
        self._api_key = address.api_key
        self.timeout = timeout
        self._session = requests.Session()
        self._auth: str | None = None

    def _authorization(self) -> str:
        if self._auth is None:
            if self._api_key.count(".") == 2:  # a JWT: personal access (refresh) token
                access = self._call("POST", "/api/token/refresh/", auth=False,
                                    json={"refresh": self._api_key}).json()["access"]
                self._auth = f"Bearer {access}"
            else:
                self._auth = f"Token {self._api_key}"
        return self._auth

    def _call(self, method: str, path: str, auth: bool = True, **kwargs: Any
              ) -> requests.Response:
        url = self.url + path
        headers = {"Authorization": self._authorization()} if auth else {}
        try:
            response = self._session.request(method, url, headers=headers,
                                             timeout=self.timeout, **kwargs)
        except requests.RequestException as exc:
            raise LabelStudioError(f"{method} {url}: {exc}") from None
        if response.status_code >= 400:
            kind = Failure.TRANSIENT if response.status_code >= 500 or \
                response.status_code == 429 else Failure.CONFIG
            raise LabelStudioError(f"{method} {url}: HTTP {response.status_code}: "
                                   f"{response.text[:300]}", kind)
        return response

    def create_project(self, title: str, label_config: str) -> dict:
        return self._call("POST", "/api/projects/",
                          json={"title": title, "label_config": label_config}).json()

    def project(self, project: int) -> dict:
        return self._call("GET", f"/api/projects/{project}/").json()

    def import_tasks(self, project: int, tasks: list[dict]) -> dict:
        """Import tasks (with their predictions); Label Studio's import summary."""
        return self._call("POST", f"/api/projects/{project}/import", json=tasks).json()

    def export(self, project: int, export_type: str = "JSON") -> bytes:
        """The project's annotated tasks as `export_type` (JSON or JSON_MIN), as bytes."""
        if export_type not in EXPORT_TYPES:
            raise LabelStudioError(f"export type {export_type!r} not one of {EXPORT_TYPES}",
                                   Failure.CONFIG)
        return self._call("GET", f"/api/projects/{project}/export",
                          params={"exportType": export_type}).content


def read_tasks(path: str | os.PathLike[str]) -> list[dict]:
    """Label Studio import tasks from a tasks file, or a preannotate batch folder."""
    source = os.fspath(path)
    if storage.is_local(source) and Path(source).is_dir():
        source = str(Path(source) / TASK_FILES["labelstudio"])
    try:
        tasks = json.loads(storage.read_text(source))
    except (OSError, ValueError) as exc:
        raise LabelStudioError(f"{source}: cannot read tasks: {exc}", Failure.CONFIG) from None
    if not isinstance(tasks, list) or not all(isinstance(t, dict) and "data" in t
                                              for t in tasks):
        raise LabelStudioError(f"{source}: not Label Studio tasks (a JSON list of objects "
                               "with `data`)", Failure.CONFIG)
    return tasks


def push_tasks(client: LabelStudioClient, tasks_path: str, project: int | None = None,
               title: str | None = None, label_map: str | None = None) -> dict:
    """Import a batch of tasks into `project`, or into a new project titled `title` whose
    labeling config is made from `label_map`; the summary names the project."""
    tasks = read_tasks(tasks_path)
    if project is None:
        if not (title and label_map):
            raise LabelStudioError("no project: give a project id, or a title and a label map "
                                   "to create one", Failure.CONFIG)
        project = client.create_project(title, labeling_config(read_label_map(label_map)))["id"]
    imported = client.import_tasks(project, tasks)
    versions = sorted({p.get("model_version") for t in tasks for p in t.get("predictions") or []
                       if p.get("model_version")})
    return {"url": client.url, "project": project, "tasks": len(tasks),
            "imported": imported.get("task_count"),
            "predictions": imported.get("prediction_count"), "model_versions": versions}


def annotation_state(tasks: list[dict]) -> str:
    """A digest of every annotation's id, update time and cancellation in a JSON export:
    any submitted, changed or deleted annotation changes it."""
    seen = sorted(json.dumps([task.get("id"), a.get("id"), a.get("updated_at"),
                              bool(a.get("was_cancelled"))], default=str)
                  for task in tasks if isinstance(task, dict)
                  for a in task.get("annotations") or [] if isinstance(a, dict))
    return hashlib.sha256("\n".join(seen).encode()).hexdigest()


def _export_name(project: int, export_type: str) -> str:
    return f"project-{project}{'-min' if export_type == 'JSON_MIN' else ''}.json"


def pull_export(client: LabelStudioClient, project: int, out_dir: str | os.PathLike[str],
                export_type: str = "JSON", marker: str | None = "_SUCCESS",
                data: bytes | None = None) -> dict:
    """Write the project's export to `out_dir` atomically: the export file, `labelstudio.json`
    (project, url, type, annotation state, time) and the marker last, so a sensor never sees
    half an export. `data` is an export already fetched (as JSON)."""
    data = client.export(project, export_type) if data is None else data
    try:
        tasks = json.loads(data)
    except ValueError as exc:
        raise LabelStudioError(f"{client.url} project {project}: the export is not JSON: "
                               f"{exc}") from None
    full = export_type == "JSON"  # JSON-MIN: one flat record a task, no annotation ids
    pulled = {"url": client.url, "project": project, "export_type": export_type,
              "tasks": len(tasks), "annotations": sum(
                  len(t.get("annotations") or []) for t in tasks if isinstance(t, dict))
              if full else None,
              "state": annotation_state(tasks) if full else None,
              "pulled_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    out = Path(os.fspath(out_dir))
    with storage.atomic_directory(out) as tmp:
        storage.write_bytes(tmp / _export_name(project, export_type), data)
        storage.write_text(tmp / PULL_FILE, json.dumps(pulled, indent=2, sort_keys=True))
        if marker:
            storage.write_text(tmp / marker, "")
    return {**pulled, "out": str(out), "file": str(out / _export_name(project, export_type))}


@dataclass(frozen=True)
class ProjectSource:
    """`labelstudio://<connection id>/projects/<id>`: a project as the exports source."""

    conn_id: str
    project: int

    @classmethod
    def parse(cls, path: str) -> ProjectSource | None:
        """The source `path` names, None if it is not a labelstudio:// path."""
        if not path.startswith(SCHEME):
            return None
        conn_id, _, rest = path[len(SCHEME):].partition("/")
        parts = rest.strip("/").split("/")
        if not conn_id or len(parts) != 2 or parts[0] != "projects" or not parts[1].isdigit():
            raise LabelStudioError(f"exports.path {path!r}: expected "
                                   f"{SCHEME}<connection id>/projects/<project id>",
                                   Failure.CONFIG)
        return cls(conn_id, int(parts[1]))


def newest_pull(pulls: str | os.PathLike[str], project: int) -> Path | None:
    """The newest complete pull of `project` under `pulls` (names sort by time), if any."""
    folder = Path(os.fspath(pulls))
    found = sorted(folder.glob(f"project-{project}-*/{PULL_FILE}")) if folder.is_dir() else []
    return found[-1].parent if found else None


def last_pull(pulls: str | os.PathLike[str], project: int) -> dict | None:
    """`labelstudio.json` of the newest complete pull of `project` under `pulls`, if any."""
    newest = newest_pull(pulls, project)
    return json.loads((newest / PULL_FILE).read_text()) if newest else None


def pull_if_new(client: LabelStudioClient, project: int, pulls: str | os.PathLike[str],
                marker: str | None = "_SUCCESS") -> dict | None:
    """Pull `project` into `<pulls>/project-<id>-<UTC time, in microseconds>` when its
    annotations changed since the last pull there (and it has any); its summary, else None."""
    data = client.export(project, "JSON")
    tasks = json.loads(data)
    before = last_pull(pulls, project)
    if not any(t.get("annotations") for t in tasks) or (
            before and before.get("state") == annotation_state(tasks)):
        return None
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")  # sorts by time
    return pull_export(client, project, Path(os.fspath(pulls)) / f"project-{project}-{stamp}",
                       "JSON", marker, data=data)


def watch_project(client: LabelStudioClient, project: int, pulls: str | os.PathLike[str],
                  marker: str | None = "_SUCCESS") -> tuple[str | None, dict | None]:
    """What an exports sensor sees of a project: (the newest pull's folder, the summary of a
    pull made now because annotations changed, or None). A pull is a full snapshot of the
    project, so only the newest is an export to take; the ledger tells if a run took it."""
    pulled = pull_if_new(client, project, pulls, marker)
    newest = newest_pull(pulls, project)
    return (str(newest) if newest else None), pulled
