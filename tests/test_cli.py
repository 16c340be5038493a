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


@pytest.fixture()
def dataset_versions(tmp_path) -> tuple[Path, list[dict]]:
    """A pipeline whose datasets folder holds two versions: Monday's labelImg export, then
    Tuesday's (one image re-labelled, one removed by its deleted file, two new)."""
    from odapi_operators.core.data.ingest import ingest

    from support.fakes import voc_export

    cat, dog = ("cat", 10, 10, 60, 50), ("dog", 30, 20, 110, 80)
    monday = voc_export(tmp_path / "exports" / "monday", 1_767_600_000,
                        {"a.jpg": [cat], "b.jpg": [dog], "c.jpg": [cat, dog]})
    tuesday = voc_export(tmp_path / "exports" / "tuesday", 1_767_686_400,
                         {"a.jpg": [dog], "d.jpg": [cat], "e.jpg": [cat]}, deleted=["b.jpg"])
    (tmp_path / "pipeline.yaml").write_text(json.dumps({
        "home": str(tmp_path), "exports": {"path": str(tmp_path / "exports")},
        "train": {"model_config": "m.yaml", "steps": 1},
        "serving": {"base": "serving", "model_name": "shapes"}}))
    datasets = tmp_path / "var" / "datasets"
    summaries = [ingest([str(export)], tmp_path / "runs" / run_id, datasets_dir=str(datasets),
                        run_id=run_id, marker="_SUCCESS")
                 for run_id, export in (("monday", monday), ("tuesday", tuesday))]
    return tmp_path / "pipeline.yaml", summaries


def test_dataset_list_show_and_diff(dataset_versions):
    pipeline, (first, second) = dataset_versions
    odapi = ENTRY_POINTS["python-m"]
    listed = run(odapi, "dataset", "list", "--pipeline", str(pipeline))
    assert listed.returncode == 0, listed.stderr
    header, one, two = listed.stdout.splitlines()
    assert header.split() == ["VERSION", "CURRENT", "PARENT", "CREATED", "RUN", "IMAGES",
                              "BOXES", "CHANGES"]
    assert one.split()[:3] == [first["fingerprint"], "-", "-"]  # not current, no parent
    assert one.split()[-6:] == ["monday", "3", "4", "+3", "~0", "-0"]
    assert two.split()[:3] == [second["fingerprint"], "*", first["fingerprint"]]
    assert two.split()[-6:] == ["tuesday", "4", "5", "+2", "~1", "-1"]

    shown = run(odapi, "dataset", "show", second["fingerprint"][:8], "--pipeline", str(pipeline))
    assert shown.returncode == 0, shown.stderr
    text = shown.stdout
    assert f"version {second['fingerprint']} (current)" in text
    assert f"parent:   {first['fingerprint']}" in text
    assert "changes:  +2 added, ~1 changed, -1 removed" in text
    assert "incremental" in text and "/exports/tuesday" in text
    assert [line.split() for line in text.splitlines() if line.startswith(("cat", "dog"))] == [
        ["cat", "2", "3", "+1"], ["dog", "2", "2", "+0"]]

    diffed = run(odapi, "dataset", "diff", first["fingerprint"], second["fingerprint"],
                 "--datasets", str(Path(second["version"]).parent), "--json")
    assert diffed.returncode == 0, diffed.stderr
    diff = json.loads(diffed.stdout)
    assert (diff["added"], diff["changed"], diff["removed"]) == (["d", "e"], ["a"], ["b"])
    assert diff["classes_before"] == {"cat": 2, "dog": 2}
    assert diff["classes_after"] == {"cat": 3, "dog": 2}
    text = run(odapi, "dataset", "diff", second["fingerprint"], first["fingerprint"],
               "--pipeline", str(pipeline)).stdout
    assert "+1 images added: b" in text and "-2 images removed: d e" in text


def test_dataset_show_of_an_unknown_version_names_the_folder_and_fails_as_data(
        dataset_versions):
    pipeline, _ = dataset_versions
    result = run(ENTRY_POINTS["python-m"], "dataset", "show", "feedbeef", "--pipeline",
                 str(pipeline))
    assert result.returncode == 4
    assert "'feedbeef' is not a version" in result.stderr and "Traceback" not in result.stderr
