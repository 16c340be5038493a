"""odapi as an Airflow provider: the entry point's metadata, and ProvidersManager seeing our
connection types and their UI forms after a real `pip install` of the project."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

from odapi_operators.provider import get_provider_info

from conftest import ROOT


def _schema(name: str) -> dict:
    import airflow

    return json.loads((Path(airflow.__path__[0]) / name).read_text())


def test_the_provider_info_is_what_airflow_accepts():
    import jsonschema

    info = get_provider_info()
    jsonschema.validate(info, _schema("provider_info.schema.json"))
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert info["package-name"] == project["name"]  # ProvidersManager refuses a mismatch
    entry = project["entry-points"]["apache_airflow_provider"]["provider_info"]
    assert entry == "odapi_operators.provider:get_provider_info"
    forms = _schema("customized_form_field_behaviours.schema.json")
    for connection in info["connection-types"]:
        module, _, name = connection["hook-class-name"].rpartition(".")
        hook = getattr(importlib.import_module(module), name)
        assert hook.conn_type == connection["connection-type"]
        behaviour = connection["ui-field-behaviour"]
        jsonschema.validate({key.replace("-", "_"): value for key, value in behaviour.items()},
                            forms)


PROBE = textwrap.dedent("""
    import json
    from airflow.providers_manager import ProvidersManager

    manager = ProvidersManager()
    print(json.dumps({
        "provider": manager.providers["odapi"].data["name"],
        "hooks": {kind: manager.hooks[kind].hook_class_name
                  for kind in ("tf_serving", "labelstudio")},
        "forms": {kind: manager.field_behaviours[kind] for kind in ("tf_serving", "labelstudio")},
        "names": {kind: manager.hooks[kind].hook_name for kind in ("tf_serving", "labelstudio")},
        "from": __import__("odapi_operators").__file__,
    }))
""")


@pytest.mark.slow
def test_providers_manager_sees_our_connection_types_after_pip_install(tmp_path):
    """The project installed by pip (a copy, so the worktree gets no build/), first on the
    path: Airflow discovers it through the entry point, hooks and forms included."""
    source = tmp_path / "src"
    shutil.copy(ROOT / "pyproject.toml", source.mkdir() or source / "pyproject.toml")
    shutil.copytree(ROOT / "plugins" / "odapi_operators", source / "plugins" / "odapi_operators",
                    ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                    "--no-build-isolation", "--no-index", "--target", str(tmp_path / "site"),
                    str(source)], check=True, capture_output=True, timeout=300)
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(tmp_path / "site")})
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["from"].startswith(str(tmp_path / "site"))
    assert seen["provider"] == "odapi"
    assert seen["hooks"] == {"tf_serving": "odapi_operators.hooks.TFServingHook",
                             "labelstudio": "odapi_operators.hooks.LabelStudioHook"}
    assert seen["names"] == {"tf_serving": "TensorFlow Serving", "labelstudio": "Label Studio"}
    serving = seen["forms"]["tf_serving"]
    assert serving["relabeling"] == {"host": "gRPC host", "port": "gRPC port"}
    assert serving["hidden_fields"] == ["schema", "login", "password"]
    assert seen["forms"]["labelstudio"]["relabeling"]["password"] == "API token"
