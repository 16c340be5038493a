"""The `odapi` console script and `python -m odapi_operators`, run as real child processes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ODAPI = Path(sys.executable).parent / "odapi"

ENTRY_POINTS = {
    "console-script": [str(ODAPI)],
    "python-m": [sys.executable, "-m", "odapi_operators"],
}


def run(cmd: list[str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*cmd, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("entry", ENTRY_POINTS, ids=list(ENTRY_POINTS))
def test_sample_then_ingest_print_json(entry, tmp_path):
    cmd = ENTRY_POINTS[entry]
    if entry == "console-script":
        assert ODAPI.is_file(), f"console script not installed at {ODAPI}"
    export = tmp_path / "export"
    sample = run(cmd, "sample", "--out", str(export), "--count", "4", "--seed", "3")
    assert sample.returncode == 0, sample.stderr
    sample_summary = json.loads(sample.stdout)
    assert sample_summary["images"] == 4 and sample_summary["out"] == str(export)
    assert len(list(export.glob("*.jpg"))) == 4 and (export / "_SUCCESS").is_file()

    out = tmp_path / "ingest"
    ingest = run(cmd, "ingest", str(export), "--out", str(out))
    assert ingest.returncode == 0, ingest.stderr
    assert len(ingest.stdout.strip().splitlines()) == 1  # one JSON document, nothing else
    summary = json.loads(ingest.stdout)
    assert summary["images"] == 4
    assert summary["boxes"] == sample_summary["boxes"]
    assert summary["manifest"] == str(out / "manifest.jsonl")
    assert len((out / "manifest.jsonl").read_text().splitlines()) == 4


def test_both_entry_points_agree(tmp_path):
    outputs = []
    for name, cmd in ENTRY_POINTS.items():
        result = run(cmd, "sample", "--out", str(tmp_path / name), "--count", "2", "--seed", "9")
        assert result.returncode == 0, result.stderr
        outputs.append({k: v for k, v in json.loads(result.stdout).items() if k != "out"})
    assert outputs[0] == outputs[1]
    a, b = (sorted((tmp_path / name).glob("*.jpg")) for name in ENTRY_POINTS)
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]


@pytest.mark.parametrize("entry", ENTRY_POINTS, ids=list(ENTRY_POINTS))
def test_ingest_empty_folder_exits_with_the_data_failure(entry, tmp_path):
    empty = tmp_path / "empty_export_folder"
    empty.mkdir()
    result = run(ENTRY_POINTS[entry], "ingest", str(empty), "--out", str(tmp_path / "out"))
    assert result.returncode == 4  # bad data: an operator fails without retrying
    assert result.stdout == ""
    assert result.stderr.startswith("odapi ingest: error:")
    assert "empty_export_folder" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("entry", ENTRY_POINTS, ids=list(ENTRY_POINTS))
def test_unknown_stage_exits_2(entry):
    result = run(ENTRY_POINTS[entry], "no-such-stage")
    assert result.returncode == 2
    assert "no-such-stage" in result.stderr
    assert result.stdout == ""


def test_missing_required_argument_exits_2(tmp_path):
    result = run(ENTRY_POINTS["python-m"], "ingest", str(tmp_path))
    assert result.returncode == 2
    assert "--out" in result.stderr
