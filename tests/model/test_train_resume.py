"""Training survives being killed: the re-run continues from the newest checkpoint."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

from conftest import odapi, tiny_model_config

pytestmark = pytest.mark.slow


def test_killed_training_resumes_from_its_checkpoint(trained_model, tmp_path):
    """A warm-started training killed mid-way: the retry (same arguments, so the same start
    point) resumes from its own newest checkpoint, not from the start point."""
    records = trained_model["records"]
    model_config = tiny_model_config(tmp_path, steps_per_loop=5, summary_interval=5,
                                     checkpoint_interval=5)
    model_dir = tmp_path / "model"
    args = [sys.executable, "-u", "-m", "odapi_operators", "train", "--model-config",
            str(model_config), "--data", str(records), "--out", str(model_dir),
            "--steps", "40", "--batch-size", "2",
            "--init-checkpoint", str(trained_model["model_dir"])]

    child = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env=os.environ)
    progress = []
    for line in child.stdout:
        if line.startswith("progress: step"):
            progress.append(line)
            if len(progress) == 3:  # three loops done: checkpoints at 5, 10, 15 exist
                child.send_signal(signal.SIGKILL)
                break
    child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL, "training finished before it could be killed"
    assert "| loss " in progress[0] and "steps/s | ETA" in progress[0]
    killed_at = max(int(p.name.split("-")[1].split(".")[0])
                    for p in model_dir.glob("ckpt-*.index"))
    assert 5 <= killed_at < 40

    done = odapi(*args[4:])
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["resumed_from_step"] == killed_at
    assert summary["start"]["from"] == "resumed", summary["start"]
    assert summary["steps"] == 40
    first = next(line for line in done.stdout.splitlines() if line.startswith("progress: step"))
    assert first.startswith(f"progress: step {killed_at + 5}/40")
    kept = sorted(int(p.name.split("-")[1].split(".")[0]) for p in model_dir.glob("ckpt-*.index"))
    assert kept[-1] == 40 and len(kept) <= 3  # max_to_keep: 3 in the model config


def test_a_rerun_on_a_finished_model_dir_returns_the_first_runs_summary(trained_model, tmp_path):
    """An Airflow retry (or a cleared task) after the last checkpoint: no step to run, so
    nothing may inspect a model that was never built; the re-run returns the same summary."""
    model_dir = tmp_path / "model"
    shutil.copytree(trained_model["model_dir"], model_dir)
    first = json.loads((model_dir / "summary.json").read_text())
    checkpoints = {p.name: p.stat().st_mtime_ns for p in model_dir.glob("ckpt-*")}

    done = odapi("train", "--model-config", str(tiny_model_config(tmp_path)),
                 "--data", str(trained_model["records"]), "--out", str(model_dir),
                 "--steps", str(first["steps"]), "--batch-size", "2", check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary == {**first, "model_dir": str(model_dir),
                       "checkpoint": str(model_dir / f"ckpt-{first['steps']}")}
    assert {p.name: p.stat().st_mtime_ns for p in model_dir.glob("ckpt-*")} == checkpoints

    from odapi_operators.core.model.train import _parameter_count

    # what a re-run reports when the first run died before writing its summary
    assert _parameter_count(summary["checkpoint"]) == first["parameters"]
