"""One trainer per model dir: a second one fails (transient, naming the owner) instead of
interleaving its checkpoints with the first's, and a SIGKILLed owner leaves no stale lock."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from odapi_operators.core.failures import EXIT_CODES, Failure
from odapi_operators.core.testpoints import ENV as PAUSE_ENV
from odapi_operators.core.testpoints import SIGNAL_ENV

from conftest import SAMPLE_MODEL, odapi


def _train_args(model_dir: Path) -> list[str]:
    return ["train", "--model-config", str(SAMPLE_MODEL), "--data", str(model_dir.parent / "x"),
            "--out", str(model_dir), "--steps", "4", "--batch-size", "2"]


def _owner(model_dir: Path, signal_file: Path) -> subprocess.Popen:
    """`odapi train` frozen right after it took the model dir (before TensorFlow loads)."""
    env = {**os.environ, PAUSE_ENV: "train:owns_model_dir", SIGNAL_ENV: str(signal_file)}
    owner = subprocess.Popen([sys.executable, "-m", "odapi_operators", *_train_args(model_dir)],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not (signal_file.exists() and signal_file.read_text()):
        assert owner.poll() is None, owner.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "the trainer never took the model dir"
        time.sleep(0.05)
    return owner


def test_a_second_trainer_into_the_same_model_dir_fails_naming_the_owner(tmp_path):
    model_dir = tmp_path / "model"
    owner = _owner(model_dir, tmp_path / "first.paused")
    try:
        second = odapi(*_train_args(model_dir), check=False)
        assert second.returncode == EXIT_CODES[Failure.TRANSIENT]  # a retry may succeed later
        assert f"{model_dir}: another training owns this model dir (pid {owner.pid} on " \
            in second.stderr
        assert not (model_dir / "params.yaml").exists()  # it wrote nothing into the dir
    finally:
        owner.kill()
        owner.wait()
    successor = _owner(model_dir, tmp_path / "third.paused")  # the dead owner's lock is free
    successor.kill()
    successor.wait()
