"""Ingest: unknown-class policy, append-only label map, immutable dataset versions, CLI summary."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from odapi_operators.core.data.datasets import list_versions
from odapi_operators.core.data.ingest import ingest
from odapi_operators.core.data.label_map import format_label_map, read_label_map
from odapi_operators.core.data.manifest import read_manifest
from odapi_operators.core.data.sample_data import generate
from odapi_operators.core.rejections import StageError


@pytest.fixture()
def export(tmp_path: Path) -> Path:
    generate(tmp_path / "export", count=16, seed=5)
    return tmp_path / "export"


def _known(tmp_path: Path, classes: dict[str, int]) -> str:
    path = tmp_path / "known.pbtxt"
    path.write_text(format_label_map(classes))
    return str(path)


def _rejections(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "rejections.jsonl").read_text().splitlines()]


def test_add_policy_extends_label_map_without_renumbering(tmp_path, export):
    known = _known(tmp_path, {"triangle": 1, "hexagon": 2})
    summary = ingest([str(export)], tmp_path / "out", label_map=known, unknown_classes="add")
    ids = read_label_map(summary["label_map"])
    assert ids == {"triangle": 1, "hexagon": 2, "circle": 3, "square": 4}
    assert summary["rejected"] == 0


def test_skip_policy_drops_unknown_boxes_and_reports_each_image(tmp_path, export):
    everything = ingest([str(export)], tmp_path / "all")
    known = _known(tmp_path, {"circle": 1})
    summary = ingest([str(export)], tmp_path / "out", label_map=known, unknown_classes="skip")
    assert summary["classes"] == {"circle": everything["classes"]["circle"]}
    assert summary["images"] == everything["images"]  # images kept, boxes dropped
    rejected = _rejections(tmp_path / "out")
    images_with_others = [r for r in read_manifest(tmp_path / "all" / "manifest.jsonl")
                          if any(b.label != "circle" for b in r.boxes)]
    assert len(rejected) == len(images_with_others)
    assert all(r["reason"].startswith("unknown class skipped:") for r in rejected)
    assert summary["rejections_by_reason"] == {"unknown class skipped": len(rejected)}


def test_reject_policy_rejects_whole_images(tmp_path, export):
    everything = list(read_manifest(ingest([str(export)], tmp_path / "all")["manifest"]))
    known = _known(tmp_path, {"circle": 1, "square": 2})
    summary = ingest([str(export)], tmp_path / "out", label_map=known, unknown_classes="reject")
    with_triangle = [r for r in everything if any(b.label == "triangle" for b in r.boxes)]
    assert summary["images"] == len(everything) - len(with_triangle)
    assert "triangle" not in summary["classes"]
    assert {r["record"] for r in _rejections(tmp_path / "out")} == {
        r.source_id for r in with_triangle}


def test_same_exports_same_version_and_changed_box_new_version(tmp_path, export):
    datasets = tmp_path / "datasets"
    first = ingest([str(export)], tmp_path / "a", datasets_dir=str(datasets))
    again = ingest([str(export)], tmp_path / "b", datasets_dir=str(datasets))
    assert first["new_version"] is True and again["new_version"] is False
    assert first["fingerprint"] == again["fingerprint"]
    xml = export / "shapes_00000.xml"
    xml.write_text(re.sub(r"<xmin>(\d+)</xmin>", lambda m: f"<xmin>{int(m[1]) + 1}</xmin>",
                          xml.read_text(), count=1))
    changed = ingest([str(export)], tmp_path / "c", datasets_dir=str(datasets))
    assert changed["new_version"] is True and changed["fingerprint"] != first["fingerprint"]
    versions = list_versions(datasets)
    assert [v["fingerprint"] for v in versions] == [first["fingerprint"], changed["fingerprint"]]
    assert versions[1]["parent"] == first["fingerprint"]  # the re-labelled export applies
    assert (changed["added"], changed["changed"], changed["removed"]) == (0, 1, 0)
    version_dir = datasets / first["fingerprint"]
    assert sorted(p.name for p in version_dir.iterdir()) == [
        "diff.json", "label_map.pbtxt", "manifest.jsonl", "summary.json"]


def test_unknown_policy_name_is_refused(tmp_path, export):
    with pytest.raises(StageError, match="unknown_classes"):
        ingest([str(export)], tmp_path / "out", label_map=_known(tmp_path, {"circle": 1}),
               unknown_classes="ignore")


def test_cli_ingest_prints_summary_and_writes_outputs(tmp_path, export):
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "odapi_operators", "ingest", str(export),
                           "--out", str(out), "--format", "voc"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert {"images", "boxes", "rejected", "classes", "fingerprint"} <= set(summary)
    assert summary["images"] == 16
    assert {p.name for p in out.iterdir()} >= {"manifest.jsonl", "label_map.pbtxt",
                                               "rejections.jsonl", "summary.json"}


def test_label_map_that_renumbers_production_fails_loudly(tmp_path, export):
    production = tmp_path / "production.pbtxt"
    production.write_text(format_label_map({"circle": 1, "square": 2, "triangle": 3}))
    renumbered = _known(tmp_path, {"square": 1, "circle": 2, "triangle": 3})
    with pytest.raises(StageError, match=r"would renumber.*circle: 1 -> 2.*square: 2 -> 1"):
        ingest([str(export)], tmp_path / "out", label_map=renumbered,
               production_label_map=str(production))
    extended = _known(tmp_path, {"circle": 1, "square": 2, "triangle": 3, "star": 4})
    summary = ingest([str(export)], tmp_path / "ok", label_map=extended,
                     production_label_map=str(production))
    assert read_label_map(summary["label_map"])["star"] == 4


def test_label_map_stage_rerun_refuses_to_contradict_itself(tmp_path, export):
    from odapi_operators.core.data.label_map import LabelMapError, build_label_map

    manifest = ingest([str(export)], tmp_path / "ingest")["manifest"]
    out = tmp_path / "label_map"
    first = build_label_map(manifest, out)
    assert build_label_map(manifest, out)["classes"] == first["classes"]  # idempotent
    (out / "label_map.pbtxt").write_text(format_label_map({"square": 1, "circle": 2,
                                                          "triangle": 3}))
    with pytest.raises(LabelMapError, match="would renumber"):
        build_label_map(manifest, out)
