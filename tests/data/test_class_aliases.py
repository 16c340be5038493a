"""Class names that differ only in case (issue #15, item 7), and aliases that merge them.

A real Label Studio project had "Butterfly" and "butterfly": two classes, silently. Ingest now
warns once per set of variants, naming them, their box counts and the alias to set; and
`exports.class_aliases` maps names to one class before the label map sees them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from odapi_operators.core.data.ingest import ingest
from odapi_operators.core.data.label_map import read_label_map
from odapi_operators.core.failures import Failure
from odapi_operators.core.rejections import StageError


def labelstudio_export(folder: Path, labels: list[list[str]]) -> Path:
    """A Label Studio JSON export, one task per image, one box per label."""
    tasks = []
    for index, names in enumerate(labels, start=1):
        path = folder / f"img{index}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (120, 90), (10, 120, 200)).save(path, "JPEG")
        result = [{"id": f"r{index}{n}", "type": "rectanglelabels", "from_name": "label",
                   "to_name": "image", "original_width": 120, "original_height": 90,
                   "value": {"x": 10 * n, "y": 10, "width": 10, "height": 20, "rotation": 0,
                             "rectanglelabels": [name]}} for n, name in enumerate(names)]
        tasks.append({"id": index, "data": {"image": f"/data/local-files/?d={path.name}"},
                      "annotations": [{"id": 100 + index, "result": result,
                                       "was_cancelled": False}], "predictions": []})
    (folder / "export.json").write_text(json.dumps(tasks))
    return folder


MIXED = [["Butterfly", "Bee"], ["Butterfly"], ["butterfly", "BEE"]]


def test_case_variants_are_warned_once_each_naming_counts_and_the_alias(tmp_path):
    export = labelstudio_export(tmp_path / "export", MIXED)
    summary = ingest([str(export)], tmp_path / "out")
    assert summary["classes"] == {"BEE": 1, "Bee": 1, "Butterfly": 2, "butterfly": 1}
    assert sorted(summary["warnings"]) == [
        "class names differ only in case: 'BEE' (1 box), 'Bee' (1 box) are 2 classes; "
        "if they are one, set exports.class_aliases: {BEE: Bee}",
        "class names differ only in case: 'Butterfly' (2 boxes), 'butterfly' (1 box) are 2 "
        "classes; if they are one, set exports.class_aliases: {butterfly: Butterfly}"]


def test_aliases_make_one_class_before_the_label_map(tmp_path):
    export = labelstudio_export(tmp_path / "export", MIXED)
    out = tmp_path / "out"
    summary = ingest([str(export)], out, class_aliases={"butterfly": "Butterfly",
                                                        "BEE": "Bee"})
    assert summary["classes"] == {"Bee": 2, "Butterfly": 3} and summary["warnings"] == []
    assert summary["aliased"] == {"BEE -> Bee": 1, "butterfly -> Butterfly": 1}
    assert set(read_label_map(out / "label_map.pbtxt")) == {"Bee", "Butterfly"}


def test_a_variant_of_a_label_map_class_is_warned_with_the_label_maps_spelling(tmp_path):
    """Production says `butterfly`; an export spelling it `Butterfly` would add a class."""
    export = labelstudio_export(tmp_path / "export", [["Butterfly"]])
    previous = tmp_path / "label_map.pbtxt"
    previous.write_text("item {\n  id: 1\n  name: 'butterfly'\n}\n")
    summary = ingest([str(export)], tmp_path / "out", label_map=str(previous))
    assert summary["warnings"] == [
        "class names differ only in case: 'Butterfly' (1 box), 'butterfly' (label map) are "
        "2 classes; if they are one, set exports.class_aliases: {Butterfly: butterfly}"]


def test_chained_aliases_are_a_config_error(tmp_path):
    export = labelstudio_export(tmp_path / "export", MIXED)
    with pytest.raises(StageError, match="'BEE' map to names that are aliased again") as info:
        ingest([str(export)], tmp_path / "out", class_aliases={"BEE": "bee", "bee": "Bee"})
    assert info.value.failure == Failure.CONFIG


def test_cli_warns_in_flag_words_and_takes_the_aliases_as_a_flag(tmp_path):
    """`odapi ingest` (a real child process) logs the warning with the flag to set; run again
    with that flag, the project has one class per name."""
    export = labelstudio_export(tmp_path / "export", MIXED[:1] + MIXED[2:])
    command = [sys.executable, "-m", "odapi_operators", "ingest", str(export)]
    warned = subprocess.run([*command, "--out", str(tmp_path / "a")], capture_output=True,
                            text=True, timeout=120)
    assert warned.returncode == 0, warned.stderr
    assert "--class-aliases BEE=Bee" in warned.stderr
    assert "--class-aliases butterfly=Butterfly" in warned.stderr
    merged = subprocess.run([*command, "--out", str(tmp_path / "b"), "--class-aliases",
                             "BEE=Bee,butterfly=Butterfly"], capture_output=True, text=True,
                            timeout=120)
    assert merged.returncode == 0, merged.stderr
    summary = json.loads(merged.stdout)
    assert summary["classes"] == {"Bee": 2, "Butterfly": 2} and summary["warnings"] == []
