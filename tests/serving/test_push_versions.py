"""push: crash points (SIGKILL), keep-N garbage collection, serialized concurrent pushes,
models.config step 1, the production baseline, and the same on gs:// (GCS emulator)."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from google.protobuf import text_format
from tensorflow_serving.config import model_server_config_pb2 as pb

from odapi_operators.core import storage
from odapi_operators.core.serving import models_config as serving_config
from odapi_operators.core.serving.models_config import ServingOptions
from odapi_operators.core.serving.promote import promote
from odapi_operators.core.serving.push import push
from odapi_operators.core.serving.serving_dir import (
    RUN_MARKER,
    model_lock,
    production_version,
    versions,
)
from odapi_operators.core.testpoints import ENV as PAUSE_ENV
from odapi_operators.core.testpoints import SIGNAL_ENV

from conftest import join_all
from support.fakes import fake_saved_model, promoted_fakes
from support.processes import kill_when_signalled

CHILD = ("import sys; from odapi_operators.core.serving.push import push; "
         "push(sys.argv[1], sys.argv[2], 'shapes', sys.argv[3])")


def model_config(serving: Path, name: str = "shapes") -> pb.ModelConfig:
    config = text_format.Parse((serving / "models.config").read_text(), pb.ModelServerConfig())
    return next(m for m in config.model_config_list.config if m.name == name)


def assert_serving_sees_only_complete_versions(serving: Path, sources: dict[int, Path]) -> None:
    """Every directory Serving would load is a full copy of its source; config points at them."""
    model_dir = serving / "shapes"
    numeric = sorted(int(p.name) for p in model_dir.iterdir() if p.name.isdigit())
    assert numeric == sorted(sources)
    for version, source in sources.items():
        copied = {p.relative_to(model_dir / str(version)) for p in
                  (model_dir / str(version)).rglob("*") if p.is_file()}
        expected = {p.relative_to(source) for p in source.rglob("*") if p.is_file()}
        assert copied == expected | {Path(RUN_MARKER)}
        for rel in expected:
            assert (model_dir / str(version) / rel).read_bytes() == (source / rel).read_bytes()
    if (serving / "models.config").exists():
        model = model_config(serving)
        assert serving_config.referenced(model) <= set(numeric)


def big_saved_model(path: Path, tag: str) -> Path:
    fake_saved_model(path, tag)
    for i in range(5):  # several files, so a kill can land between two of them
        (path / "variables" / f"variables.data-{i:05d}-of-00005").write_bytes(os.urandom(4096))
    return path


def kill_at(point: str, tmp_path: Path, source: Path, serving: Path, run_id: str) -> None:
    """Run a push in a child process, freeze it at `point`, SIGKILL it."""
    signal = tmp_path / f"reached-{point.replace(':', '_')}"
    env = {**os.environ, PAUSE_ENV: point, SIGNAL_ENV: str(signal)}
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(source), str(serving), run_id],
                             env=env, stderr=subprocess.PIPE, text=True)
    kill_when_signalled(child, signal, f"push {point}", timeout=30)


# --- crash points -------------------------------------------------------------------------


@pytest.mark.parametrize("point,fresh", [
    ("push:copying", True),
    ("push:before_rename", True),
    ("models_config:writing", False),  # the version is complete: a re-run finishes it
])
def test_killed_push_leaves_nothing_half_written(tmp_path, point, fresh):
    serving = tmp_path / "serving"
    first = big_saved_model(tmp_path / "e1", "one")
    push(first, serving, "shapes", "r1")
    promote(serving, "shapes", 1)
    config_before = (serving / "models.config").read_text()
    second = big_saved_model(tmp_path / "e2", "two")

    kill_at(point, tmp_path, second, serving, "r2")

    expected = {1: first} if fresh else {1: first, 2: second}
    assert_serving_sees_only_complete_versions(serving, expected)
    assert (serving / "models.config").read_text() == config_before  # old or new, never half
    assert versions(serving / "shapes") == sorted(expected)

    result = push(second, serving, "shapes", "r2")  # the re-run (e.g. Airflow's retry)
    assert result["version"] == (3 if fresh else 2)  # a burned number is never reused
    assert_serving_sees_only_complete_versions(serving, {1: first, result["version"]: second})
    assert list(model_config(serving).model_version_policy.specific.versions) == [
        1, result["version"]]
    leftovers = [p.name for p in (serving / "shapes").iterdir() if p.name.startswith(".tmp-")]
    leftovers += [p.name for p in serving.iterdir() if p.name.startswith(".tmp-")]
    assert leftovers == []
    assert push(first, serving, "shapes", "r3")["version"] == result["version"] + 1


def test_killed_label_move_keeps_previous_label(tmp_path):
    serving = tmp_path / "serving"
    push(fake_saved_model(tmp_path / "e1", "1"), serving, "shapes", "r1")
    promote(serving, "shapes", 1)
    push(fake_saved_model(tmp_path / "e2", "2"), serving, "shapes", "r2")
    signal = tmp_path / "between"
    code = ("from odapi_operators.core.serving.promote import promote; "
            f"promote({str(serving)!r}, 'shapes', 2)")
    env = {**os.environ, PAUSE_ENV: "models_config:between_steps", SIGNAL_ENV: str(signal)}
    child = subprocess.Popen([sys.executable, "-c", code], env=env)
    while not signal.exists():
        assert child.poll() is None
        time.sleep(0.02)
    child.kill()
    child.wait()
    model = model_config(serving)
    assert dict(model.version_labels) == {"stable": 1}  # step 1 only: both served
    assert list(model.model_version_policy.specific.versions) == [1, 2]
    assert promote(serving, "shapes", 2)["labels"] == {"stable": 2}  # the re-run completes


# --- models.config step 1 and labels --------------------------------------------------------


def test_push_serves_new_version_beside_stable_without_moving_labels(tmp_path):
    serving = tmp_path / "serving"
    options = ServingOptions(base_in_serving="/models")
    first = push(fake_saved_model(tmp_path / "e1", "1"), serving, "shapes", "r1",
                 options=options)
    assert first["labels"] == {} and first["models_config"] == str(serving / "models.config")
    promote(serving, "shapes", 1, options=options)
    second = push(fake_saved_model(tmp_path / "e2", "2"), serving, "shapes", "r2",
                  options=options)
    assert second["labels"] == {"stable": 1}
    model = model_config(serving)
    assert (model.base_path, model.model_platform) == ("/models/shapes", "tensorflow")
    assert list(model.model_version_policy.specific.versions) == [1, 2]


def test_push_summary_written_to_out_dir(tmp_path):
    out = tmp_path / "run" / "push"
    result = push(fake_saved_model(tmp_path / "e", "x"), tmp_path / "s", "shapes", "r", out)
    assert json.loads((out / "summary.json").read_text()) == result


# --- keep N -------------------------------------------------------------------------------


def test_gc_keeps_newest_n_and_never_stable_canary_or_pushed(tmp_path):
    serving = tmp_path / "serving"
    options = ServingOptions(keep_versions=2)
    deleted = {}
    for i in range(1, 8):
        result = push(fake_saved_model(tmp_path / f"e{i}", str(i)), serving, "shapes", f"r{i}",
                      options=options)
        deleted[i] = result["deleted"]
        if i == 1:
            promote(serving, "shapes", 1, options=options)
        if i == 3:
            promote(serving, "shapes", 3, label="canary", options=options)
    assert versions(serving / "shapes") == [1, 3, 6, 7]  # stable, canary, newest two
    assert deleted[7] == [5] and sorted(v for gone in deleted.values() for v in gone) == [2, 4, 5]
    assert [p.name for p in (serving / "shapes").iterdir() if p.name.startswith(".tmp")] == []
    assert production_version(serving, "shapes") == 1


def test_gc_with_keep_one_keeps_stable_and_the_pushed_version(tmp_path):
    serving = tmp_path / "serving"
    options = ServingOptions(keep_versions=1)
    push(fake_saved_model(tmp_path / "e1", "1"), serving, "shapes", "r1", options=options)
    promote(serving, "shapes", 1, options=options)
    push(fake_saved_model(tmp_path / "e2", "2"), serving, "shapes", "r2", options=options)
    push(fake_saved_model(tmp_path / "e3", "3"), serving, "shapes", "r3", options=options)
    assert versions(serving / "shapes") == [1, 3]


def test_gc_under_latest_policy_keeps_what_serving_loads(tmp_path):
    serving = tmp_path / "serving"
    options = ServingOptions(keep_versions=1, version_policy="latest", latest_versions=3)
    for i in range(1, 5):
        push(fake_saved_model(tmp_path / f"e{i}", str(i)), serving, "shapes", f"r{i}",
             options=options)
    assert versions(serving / "shapes") == [2, 3, 4]
    assert model_config(serving).model_version_policy.latest.num_versions == 3


# --- baseline --------------------------------------------------------------------------------


def test_production_version_is_stable_else_newest(tmp_path):
    serving = tmp_path / "serving"
    assert production_version(serving, "shapes") is None  # first model
    for i in (1, 2, 3):
        push(fake_saved_model(tmp_path / f"e{i}", str(i)), serving, "shapes", f"r{i}")
    assert production_version(serving, "shapes") == 3
    promote(serving, "shapes", 2)
    assert production_version(serving, "shapes") == 2
    (serving / "shapes" / "2" / "saved_model.pb").unlink()  # stable vanished by hand
    assert production_version(serving, "shapes") == 3


# --- concurrency ----------------------------------------------------------------------------


def _push_in_child(source: str, serving: str, run_id: str, queue, start=None) -> None:
    if start is not None:
        start.wait(30)  # all children push at the same moment
    queue.put(push(source, serving, "shapes", run_id)["version"])


def test_concurrent_pushes_are_serialized(tmp_path):
    serving = tmp_path / "serving"
    sources = [big_saved_model(tmp_path / f"e{i}", str(i)) for i in (1, 2)]
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    with model_lock(serving / "shapes"):  # both children start and queue up on the lock
        procs = [ctx.Process(target=_push_in_child, args=(str(s), str(serving), f"r{i}", queue))
                 for i, s in enumerate(sources)]
        for proc in procs:
            proc.start()
        time.sleep(0.5)
        assert versions(serving / "shapes") == []
    join_all(procs, 30)
    assert sorted(queue.get(timeout=5) for _ in procs) == [1, 2]
    by_run = {json.loads((serving / "shapes" / str(v) / RUN_MARKER).read_text())["run_id"]: v
              for v in (1, 2)}
    assert set(by_run) == {"r0", "r1"}
    assert_serving_sees_only_complete_versions(
        serving, {by_run[f"r{i}"]: s for i, s in enumerate(sources)})


# --- gs:// ---------------------------------------------------------------------------------


@pytest.fixture()
def gs_base(gcs_with_preconditions) -> str:
    return f"{gcs_with_preconditions}/serving-{os.urandom(4).hex()}"


def test_emulator_enforces_preconditions(gs_base):
    path = f"{gs_base}/probe"
    generation = storage.write_bytes_if_generation(path, b"1", 0)
    with pytest.raises(storage.PreconditionFailed, match=path):
        storage.write_bytes_if_generation(path, b"2", 0)
    storage.write_bytes_if_generation(path, b"3", generation)
    with pytest.raises(storage.PreconditionFailed):
        storage.write_bytes_if_generation(path, b"4", generation)
    assert storage.read_bytes(path) == b"3"


def test_gcs_push_versions_config_and_gc(tmp_path, gs_base):
    options = ServingOptions(keep_versions=1)
    for i in (1, 2, 3):
        result = push(fake_saved_model(tmp_path / f"e{i}", str(i)), gs_base, "shapes", f"r{i}",
                      options=options)
        assert result["version"] == i and result["path"] == f"{gs_base}/shapes/{i}"
        if i == 1:
            promote(gs_base, "shapes", 1, options=options)
    assert versions(f"{gs_base}/shapes") == [1, 3]  # stable kept, 2 collected
    assert storage.read_bytes(f"{gs_base}/shapes/3/saved_model.pb") == b"graph-3"
    assert storage.list_files(f"{gs_base}/shapes/2") == []
    config = serving_config.read(f"{gs_base}/models.config")
    model = serving_config.entry(config, "shapes")
    assert model.base_path == f"{gs_base}/shapes"
    assert dict(model.version_labels) == {"stable": 1}
    assert list(model.model_version_policy.specific.versions) == [1, 3]
    again = push(tmp_path / "e3", gs_base, "shapes", "r3", options=options)
    assert again["version"] == 3  # idempotent per run


def test_gcs_killed_upload_has_no_saved_model_pb_and_rerun_takes_fresh_version(tmp_path,
                                                                             gs_base):
    source = big_saved_model(tmp_path / "e", "x")
    kill_at("push:before_rename", tmp_path, source, gs_base, "r1")
    partial = storage.list_files(f"{gs_base}/shapes/1")
    assert partial and not any(p.endswith("/saved_model.pb") for p in partial)
    assert versions(f"{gs_base}/shapes") == []
    assert push(source, gs_base, "shapes", "r1")["version"] == 2


def test_gcs_concurrent_pushes_get_distinct_versions(tmp_path, gs_base):
    sources = [fake_saved_model(tmp_path / f"e{i}", str(i)) for i in (1, 2, 3)]
    ctx = multiprocessing.get_context("spawn")
    queue, start = ctx.Queue(), ctx.Barrier(len(sources))
    procs = [ctx.Process(target=_push_in_child, args=(str(s), gs_base, f"r{i}", queue, start))
             for i, s in enumerate(sources)]
    for proc in procs:
        proc.start()
    join_all(procs, 60)
    assert sorted(queue.get(timeout=5) for _ in procs) == [1, 2, 3]
    assert versions(f"{gs_base}/shapes") == [1, 2, 3]
    for version in (1, 2, 3):  # each version holds exactly one push's files
        marker = json.loads(storage.read_text(f"{gs_base}/shapes/{version}/{RUN_MARKER}"))
        graph = storage.read_bytes(f"{gs_base}/shapes/{version}/saved_model.pb")
        assert graph == f"graph-{int(marker['run_id'][1:]) + 1}".encode()
    model = serving_config.entry(serving_config.read(f"{gs_base}/models.config"), "shapes")
    assert len(model.model_version_policy.specific.versions) == 1


def _append_in_child(path: str, number: int, start) -> None:
    from odapi_operators.core.serving import registry

    start.wait(30)
    registry.append(path, {"kind": "candidate", "model": "shapes", "run_id": f"r{number}"})


def test_gcs_rollback_and_concurrent_registry_appends(tmp_path, gs_base):
    from odapi_operators.core.serving import registry
    from odapi_operators.core.serving.rollback import rollback

    for i in (1, 2):
        push(fake_saved_model(tmp_path / f"e{i}", str(i)), gs_base, "shapes", f"r{i}")
        promote(gs_base, "shapes", i)
    assert rollback(gs_base, "shapes", reason="drift")["version"] == 1
    model = serving_config.entry(serving_config.read(f"{gs_base}/models.config"), "shapes")
    assert dict(model.version_labels) == {"stable": 1}

    path = f"{gs_base}/registry.jsonl"
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Barrier(3)
    procs = [ctx.Process(target=_append_in_child, args=(path, i, start)) for i in range(3)]
    for proc in procs:
        proc.start()
    join_all(procs, 60)
    records = registry.read(path)
    assert [(r["kind"], r.get("action")) for r in records[:3]] == [
        ("label", "promote"), ("label", "promote"), ("label", "rollback")]
    assert sorted(r["run_id"] for r in records[3:]) == ["r0", "r1", "r2"]  # none lost


# --- version policy: what appears on disk must not make Serving drop a label -------------------


def numeric_dirs(model_dir: Path) -> list[str]:
    return sorted(p.name for p in model_dir.iterdir() if p.name.isdigit() or
                  p.name.startswith(".tmp-"))


def test_latest_policy_push_after_a_rollback_is_refused_before_the_version_appears(tmp_path):
    """Serving polls the directory itself under `latest`: a version 3 on disk would unload the
    rolled-back stable 1, whatever models.config says, so the push must stop before renaming."""
    from odapi_operators.core.serving.rollback import rollback

    serving = tmp_path / "serving"
    options = ServingOptions(version_policy="latest", latest_versions=2)
    promoted_fakes(tmp_path, serving, options)
    rollback(serving, "shapes", reason="drift", options=options)
    config_before = (serving / "models.config").read_text()

    with pytest.raises(serving_config.ServingConfigError,
                       match=r"serving.version_policy latest .*latest_versions 2.* stable 1"):
        push(fake_saved_model(tmp_path / "e3", "3"), serving, "shapes", "r3", options=options)

    assert numeric_dirs(serving / "shapes") == ["1", "2"]  # nothing for Serving to poll
    assert (serving / "models.config").read_text() == config_before
    wider = options.model_copy(update={"latest_versions": 3})  # the fix the message suggests
    assert push(tmp_path / "e3", serving, "shapes", "r3", options=wider)["version"] == 3


def test_switching_to_latest_widens_the_policy_before_the_version_appears(tmp_path):
    """A file still saying `latest 1` would unload stable the moment a new version appears:
    the wider policy is written first, then the version."""
    serving = tmp_path / "serving"
    narrow = ServingOptions(version_policy="latest", latest_versions=1)
    push(fake_saved_model(tmp_path / "e1", "1"), serving, "shapes", "r1", options=narrow)
    promote(serving, "shapes", 1, options=narrow)
    wide = ServingOptions(version_policy="latest", latest_versions=2)
    signal = tmp_path / "renaming"
    env = {**os.environ, PAUSE_ENV: "push:before_rename", SIGNAL_ENV: str(signal)}
    code = ("import sys; from odapi_operators.core.serving.push import push; "
            "from odapi_operators.core.serving.models_config import ServingOptions; "
            "push(sys.argv[1], sys.argv[2], 'shapes', 'r2', "
            "options=ServingOptions(version_policy='latest', latest_versions=2))")
    child = subprocess.Popen([sys.executable, "-c", code, str(fake_saved_model(
        tmp_path / "e2", "2")), str(serving)], env=env)
    try:
        deadline = time.monotonic() + 30
        while not signal.exists():
            assert child.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        model = model_config(serving)  # what Serving reads just before version 2 appears
        assert model.model_version_policy.latest.num_versions == 2
        assert serving_config.served(model, [1, 2]) == [1, 2]
    finally:
        child.kill()
        child.wait()
    assert push(tmp_path / "e2", serving, "shapes", "r2", options=wide)["version"] == 3


# --- names and paths --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../../x", "..", ".", "a/b", "/abs", ""])
def test_model_name_must_be_a_plain_name(tmp_path, name):
    base = tmp_path / "a" / "b" / "serving"
    with pytest.raises(serving_config.ServingConfigError, match="plain name"):
        push(fake_saved_model(tmp_path / "e", "x"), base, name, "r1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e"]  # nothing written anywhere


def test_cli_refuses_a_model_name_that_is_a_path(tmp_path, capsys):
    from odapi_operators.cli import main

    source = fake_saved_model(tmp_path / "e", "x")
    code = main(["push", "--saved-model", str(source), "--base", str(tmp_path / "a" / "serving"),
                 "--model-name", "../../x", "--out", str(tmp_path / "out")])
    assert code == 3
    error = capsys.readouterr().err
    assert "--model-name: a plain name" in error and "'../../x'" in error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e"]


def test_cli_relative_base_is_written_absolute(tmp_path, monkeypatch):
    from odapi_operators.cli import main

    for run in ("r1", "r2"):
        fake_saved_model(tmp_path / run / "sm", run)
    monkeypatch.chdir(tmp_path)
    for run in ("r1", "r2"):
        assert main(["push", "--saved-model", f"{run}/sm", "--base", "serving",
                     "--model-name", "shapes", "--out", f"{run}/push"]) == 0
    assert model_config(tmp_path / "serving").base_path == str(tmp_path / "serving" / "shapes")
    monkeypatch.chdir(tmp_path / "r1")  # a rollback from elsewhere rewrites the entry
    assert main(["rollback", "--base", "../serving", "--model-name", "shapes",
                 "--reason", "drift"]) == 0
    model = model_config(tmp_path / "serving")
    assert (model.base_path, dict(model.version_labels)) == (
        str(tmp_path / "serving" / "shapes"), {"stable": 1})


def test_relative_base_in_serving_is_refused(tmp_path, capsys):
    from odapi_operators.cli import main

    with pytest.raises(ValueError, match=r"base_in_serving\s+must be absolute"):
        ServingOptions(base_in_serving="models")
    code = main(["push", "--saved-model", str(fake_saved_model(tmp_path / "e", "x")),
                 "--base", str(tmp_path / "serving"), "--model-name", "shapes",
                 "--base-in-serving", "models", "--out", str(tmp_path / "out")])
    assert code == 3
    assert "--base-in-serving: " in capsys.readouterr().err
    assert not (tmp_path / "serving").exists()
