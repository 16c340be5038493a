"""Messages in the words of the interface the user used (issue #15, item 8).

The core names a setting once (`wording.setting`); the stage commands speak flags, the
Python API and pipeline configs speak config keys. Before, a user who typed `odapi ingest
--format csv` was told to "give options csv_columns with fmt='csv'".
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from odapi_operators.core.config import ImagesConfig
from odapi_operators.core.data.ingest import ingest
from odapi_operators.core.failures import EXIT_CODES, Failure
from odapi_operators.core.rejections import StageError
from odapi_operators.core.stages.runner import run_stage
from odapi_operators.core.wording import config_words, flag_words, setting, speaking

ODAPI = [sys.executable, "-m", "odapi_operators"]


def odapi(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*ODAPI, *args], capture_output=True, text=True, timeout=120)


@pytest.fixture
def unknown_csv(tmp_path) -> Path:
    """A CSV in a layout no sniffer knows (a spreadsheet export), so it needs csv_columns."""
    path = tmp_path / "export" / "boxes.csv"
    path.parent.mkdir()
    path.write_text("image_name,x1,y1,x2,y2,category\nimg.jpg,1,2,30,40,cat\n")
    return path


def test_cli_names_flags_where_the_user_typed_flags(unknown_csv, tmp_path):
    done = odapi("ingest", str(unknown_csv), "--format", "csv", "--out", str(tmp_path / "o"))
    assert done.returncode == EXIT_CODES[Failure.DATA], done.stderr
    assert "or give --csv-columns with --format csv" in done.stderr
    assert "fmt=" not in done.stderr and "options csv_columns" not in done.stderr
    bad = odapi("ingest", str(unknown_csv), "--format", "csv", "--csv-columns", "image=image_name",
                "--out", str(tmp_path / "p"))
    assert "bad --csv-columns: no column given for label, xmin" in bad.stderr
    assert "exports.csv_columns" not in bad.stderr


def test_stage_run_replays_a_config_and_names_config_keys(unknown_csv, tmp_path):
    """What an Airflow operator or a pod runs: the user wrote a pipeline config, so the same
    error names its keys."""
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(f"home: {tmp_path}\nexports: {{path: {unknown_csv.parent}, format: csv}}\n"
                        "train: {model_config: model.yaml, steps: 1}\n"
                        "serving: {base: serving, model_name: detector}\n")
    done = odapi("stage", "run", "ingest", "--pipeline", str(pipeline), "--run-id", "r1",
                 "--input", "exports", json.dumps([str(unknown_csv)]))
    assert done.returncode == EXIT_CODES[Failure.DATA], done.stderr
    assert "or give exports.csv_columns with exports.format: csv" in done.stderr
    assert "--csv-columns" not in done.stderr


def test_python_api_names_config_keys(unknown_csv, tmp_path):
    with pytest.raises(StageError) as info:
        ingest([str(unknown_csv)], tmp_path / "o", fmt="csv")
    assert "or give exports.csv_columns with exports.format: csv" in str(info.value)
    assert "--csv-columns" not in str(info.value) and "--format" not in str(info.value)


def test_stage_inputs_are_named_as_flags_or_as_keywords(tmp_path):
    """`odapi fetch` without its inputs names its flags; the same stage run from Python (as
    an operator does) names the input keywords."""
    done = odapi("fetch", "--out", str(tmp_path / "o"))
    assert done.returncode != 0
    assert "give --manifest (a manifest) or --index (an image index), one of them" in done.stderr
    with pytest.raises(ValueError, match=r"give manifest \(a manifest\) or index \(an image"):
        run_stage("fetch", inputs={}, options=ImagesConfig(), out=tmp_path / "p")


def test_words_render_names_and_values_and_the_choice_is_scoped():
    assert setting("exports.csv_columns") == "exports.csv_columns"
    with speaking(flag_words):
        assert setting("exports.csv_columns", {"image": "f", "label": "c"}) == \
            "--csv-columns image=f,label=c"
        assert setting("exports.classes", ["cat", "dog"]) == "--classes cat dog"
        assert setting("run.dry_run", False) == "--no-dry-run"
        assert setting("manifest") == "--manifest"
        with pytest.raises(RuntimeError), speaking(config_words):
            assert setting("records.split", {"train": 0.8}) == "records.split: {train: 0.8}"
            raise RuntimeError
        assert setting("exports.format", "csv") == "--format csv"  # restored after an error
    assert setting("exports.format", "csv") == "exports.format: csv"
