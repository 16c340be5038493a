"""A real Label Studio for tests: installed in its own virtualenv, started on 127.0.0.1.

Label Studio pins its own Django stack (and label-studio-sdk pins opencv < 4.13), so it never
shares the project's dependency set: `label_studio_venv` installs it once per version under
the user's cache, `~/.cache/odapi/label-studio-<version>` (or $ODAPI_LABEL_STUDIO_VENV): like
pip's cache it outlives a checkout, so later runs and other clones on the machine reuse it.

Offline: `label-studio start` reaches no network with the settings below. From its source
(label_studio/core/settings/*.py, core/utils/common.py): LATEST_VERSION_CHECK=false skips
the PyPI version check, COLLECT_ANALYTICS=false the usage reporting, an empty SENTRY_DSN /
FRONTEND_SENTRY_DSN the error reporting (label_studio.py sets a sentry.io default). The user
and its legacy API token are created at start from LABEL_STUDIO_USERNAME / _PASSWORD /
_USER_TOKEN (server.py `_create_user`); new organizations accept legacy tokens only with
LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN=true (organizations/functions.py).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

VERSION = "1.23.2"  # newest on PyPI that installs on Python 3.11 here (Dec 2026)
TOKEN = "odapi-test-token-0123456789"
USERNAME = "annotator@odapi.test"
ANNOTATOR = Path(__file__).with_name("ls_annotator.py")


def label_studio_venv(version: str = VERSION) -> Path:
    """A virtualenv with label-studio==`version`, installed once and reused; a marker written
    after a complete install tells a finished venv from an interrupted one, and a lock beside
    it makes a second test process (a pytest-xdist worker, another checkout) wait for the
    first's install instead of installing over it."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "odapi"
    venv = Path(os.environ.get("ODAPI_LABEL_STUDIO_VENV") or cache / f"label-studio-{version}")
    complete = venv / ".odapi-installed"
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / f".{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if complete.exists():
            return venv
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet",
                        f"label-studio=={version}"], check=True, timeout=900)
        complete.write_text(version)
    return venv


@dataclass
class LabelStudio:
    """A running server: its URL, token, venv (for the SDK-driven annotator), process, and
    the folder it serves local files from (`/data/local-files/?d=<path under it>`)."""

    url: str
    token: str
    venv: Path
    process: subprocess.Popen
    log: Path
    files_root: Path

    def annotator(self, command: str, payload: dict) -> object:
        """Run the SDK annotator (tests/support/ls_annotator.py) in Label Studio's venv."""
        done = subprocess.run([str(self.venv / "bin" / "python"), str(ANNOTATOR), command],
                              input=json.dumps({"url": self.url, "token": self.token,
                                                **payload}),
                              capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise AssertionError(f"annotator {command} failed:\n{done.stderr[-3000:]}")
        return json.loads(done.stdout)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


def start_label_studio(venv: Path, data_dir: Path, port: int, files_root: Path,
                       wait: float = 300) -> LabelStudio:
    """`label-studio start` on 127.0.0.1:`port`, SQLite in `data_dir`, offline; serves
    local files under `files_root`. Raises with the server's log if it is not up in `wait`."""
    env = {**os.environ, "LABEL_STUDIO_USERNAME": USERNAME, "LABEL_STUDIO_PASSWORD": "odapi-pw",
           "LABEL_STUDIO_USER_TOKEN": TOKEN, "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
           "LATEST_VERSION_CHECK": "false", "COLLECT_ANALYTICS": "false", "SENTRY_DSN": "",
           "FRONTEND_SENTRY_DSN": "", "DJANGO_DB": "sqlite", "HOME": str(data_dir),
           "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED": "true",
           "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(files_root)}
    for name in ("PYTHONPATH", "VIRTUAL_ENV", "DJANGO_SETTINGS_MODULE"):
        env.pop(name, None)  # ours must not leak into its interpreter
    log = data_dir / "label-studio.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [str(venv / "bin" / "label-studio"), "start", "--no-browser", "--internal-host",
             "127.0.0.1", "-p", str(port), "--data-dir", str(data_dir)],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    server = LabelStudio(f"http://127.0.0.1:{port}", TOKEN, venv, process, log, files_root)
    deadline = time.monotonic() + wait
    while not _healthy(server.url):
        if process.poll() is not None or time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(f"Label Studio did not start in {wait:.0f} s:\n"
                               f"{log.read_text(errors='replace')[-3000:]}")
        time.sleep(1)
    return server
