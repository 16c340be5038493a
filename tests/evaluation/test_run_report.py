"""Run report: real records, eval files per the evaluator's contract, real TensorBoard events."""

from __future__ import annotations

import json
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from odapi_operators.cli import build_parser
from odapi_operators.core.evaluation import gate
from odapi_operators.core.evaluation.report import build_report, read_losses
from odapi_operators.core.model.tfvision import val_examples

from conftest import prepare_records

HOSTILE = "<script>alert('x')</script>"
CLASSES = ("circle", "square", "triangle", HOSTILE)  # the last has no ground truth
BLUE, ORANGE = (31, 119, 180), (255, 127, 14)  # matplotlib tab:blue, tab:orange


class Page(HTMLParser):
    """The parts of report.html the tests look at: image sources, table rows, all text."""

    def __init__(self, text: str):
        super().__init__()
        self.images: list[str] = []
        self.rows: list[list[str]] = []
        self.text: list[str] = []
        self._cell: list[str] | None = None
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs)["src"])
        elif tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.rows[-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data):
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)

    def row(self, first: str) -> list[str]:
        return next(r for r in self.rows if r and r[0] == first)


def _coco_metrics(ap: float, images: int, per_class: dict, model: str) -> dict:
    keys = ("AP", "AP50", "AP75", "APs", "APm", "APl", "ARmax1", "ARmax10", "ARmax100", "ARs",
            "ARm", "ARl")
    values = {k: round(ap + 0.01 * i, 4) for i, k in enumerate(keys)}
    values["APs"] = -1.0  # no small objects: COCO says -1
    return {**values, "per_class": per_class, "per_class_AP50": per_class,
            "eval_images": images, "model": model, "model_kind": "checkpoint"}


def _ground_truth(records: Path) -> dict:
    """ground_truth.json as the evaluator writes it, from the real val records."""
    import tensorflow as tf

    ids = {name: i for i, name in enumerate(CLASSES, start=1)}
    images, annotations = [], []
    for raw in val_examples(records, 1000):
        f = tf.train.Example.FromString(raw).features.feature
        image_id = int(f["image/source_id"].bytes_list.value[0])
        width, height = f["image/width"].int64_list.value[0], f["image/height"].int64_list.value[0]
        images.append({"id": image_id, "file_name": f"{image_id}.jpg", "width": width,
                       "height": height})
        boxes = zip(*(f[f"image/object/bbox/{k}"].float_list.value
                      for k in ("xmin", "ymin", "xmax", "ymax")),
                    f["image/object/class/text"].bytes_list.value)
        for xmin, ymin, xmax, ymax, label in boxes:
            w, h = (xmax - xmin) * width, (ymax - ymin) * height
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": ids[label.decode()], "area": w * h,
                                "bbox": [xmin * width, ymin * height, w, h], "iscrowd": 0})
    return {"images": images, "annotations": annotations,
            "categories": [{"id": i, "name": n} for n, i in ids.items()]}


def _write_eval(folder: Path, ground_truth: dict, ap: float, model: str) -> Path:
    folder.mkdir(parents=True)
    detections = []
    for a in ground_truth["annotations"]:
        x, y, w, h = a["bbox"]
        detections.append({"image_id": a["image_id"], "category_id": a["category_id"],
                           "bbox": [x + 3, y + 2, w, h], "score": 0.9})
        detections.append({"image_id": a["image_id"], "category_id": a["category_id"],
                           "bbox": [x + 10, y + 10, w / 2, h / 2], "score": 0.1})
    per_class = {"circle": ap + 0.1, "square": ap, "triangle": ap - 0.1, HOSTILE: -1.0}
    metrics = _coco_metrics(ap, len(ground_truth["images"]), per_class, model)
    for name, data in (("metrics.json", metrics), ("detections.json", detections),
                       ("ground_truth.json", ground_truth)):
        (folder / name).write_text(json.dumps(data))
    return folder


def _write_loss_events(model_dir: Path, steps: int = 12) -> None:
    import tensorflow as tf

    writer = tf.summary.create_file_writer(str(model_dir / "train"))
    with writer.as_default():
        for step in range(1, steps + 1):
            tf.summary.scalar("total_loss", 3.0 / step + 0.2, step=step)
            tf.summary.scalar("cls_loss", 2.0 / step, step=step)
            tf.summary.scalar("learning_rate", 0.08, step=step)  # not a loss: not plotted
    writer.close()


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("report")
    records = prepare_records(root)
    truth = _ground_truth(records)
    candidate = _write_eval(root / "eval", truth, 0.6, str(root / "model"))
    production = _write_eval(root / "baseline_eval", truth, 0.5, "serving/7")
    _write_loss_events(root / "model")
    (root / "empty_model").mkdir()
    decision = gate.gate(candidate / "metrics.json", root / "gate",
                         {"min_ap50": 0.5, "vs_production": {"AP": {"min_delta": 0.0}}},
                         baseline_version=7, baseline_metrics=production / "metrics.json")
    return {"root": root, "records": records, "eval": candidate, "baseline": production,
            "model": root / "model", "empty_model": root / "empty_model",
            "decision": Path(decision["decision"])}


def _png(path: str | Path) -> np.ndarray:
    """The PNG's RGB pixels, after checking it is a real, non-blank PNG."""
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert 200 <= image.width <= 4000 and 150 <= image.height <= 6000
        pixels = np.asarray(image.convert("RGB"))
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 10, f"{path} is blank"
    return pixels


def _count(pixels: np.ndarray, colour: tuple[int, int, int], tolerance: int = 40) -> int:
    return int((np.abs(pixels.astype(int) - colour).max(axis=-1) <= tolerance).sum())


def test_report_compares_with_production_and_shows_decision_loss_and_boxes(run, tmp_path):
    out = tmp_path / "report"
    summary = build_report(out, run["eval"], run["records"], model_dir=run["model"],
                           baseline_eval_dir=run["baseline"], decision=run["decision"],
                           grid_images=50, title="shapes <nightly>")
    assert summary["report"] == str(out / "report.html")
    assert sorted(Path(p).name for p in summary["images"]) == [
        "loss.png", "per_class_ap.png", "slices.png", "val_grid.png"]
    images = len(json.loads((run["eval"] / "ground_truth.json").read_text())["images"])
    assert summary["grid_images"] == images and summary["promoted"] is True
    text = (out / "report.html").read_text()
    page = Page(text)

    assert sorted(page.images) == ["loss.png", "per_class_ap.png", "slices.png", "val_grid.png"]
    assert not [s for s in page.images if "/" in s]  # relative names: the folder travels
    assert "<script" not in text and "&lt;script&gt;" in text
    assert "shapes &lt;nightly&gt;" in text
    assert page.row("metric") == ["metric", "candidate", "production", "delta"]
    assert page.row("AP") == ["AP", "0.600", "0.500", "+0.100"]
    assert page.row("AP50") == ["AP50", "0.610", "0.510", "+0.100"]
    assert page.row("APs") == ["APs", "n/a", "n/a", "—"]
    for metric in ("AP75", "APm", "APl", "ARmax100"):
        assert page.row(metric)[3].startswith("+")
    assert page.row("eval_images") == ["eval_images", str(images), str(images), "+0"]
    assert page.row("square") == ["square", "0.600", "0.500", "+0.100"]
    assert page.row(HOSTILE) == [HOSTILE, "n/a", "n/a", "—"]
    # metrics evaluated without a dataset diff: slice `all` only, no matches so no interval
    assert page.row("all")[:7] == ["all", str(images), "AP50", "0.610", "0.510", "+0.100", "—"]
    assert "evaluated without a dataset diff" in "".join(page.text)
    assert page.row("AP50 >= 0.5")[1:5] == ["0.610", ">= 0.5", "—", "pass"]
    assert page.row("vs_production:AP")[1:5] == ["0.600", "improvement >= 0.0", "0.500",
                                                 "pass"]
    assert "promoted" in page.text and "all checks passed" in "".join(page.text)

    grid = _png(out / "val_grid.png")
    assert grid.shape[1] == min(images, 4) * 256  # every val image drawn, four per row
    assert _count(grid, (0, 255, 0), 0) > 100 and _count(grid, (255, 0, 0), 0) > 100
    per_class = _png(out / "per_class_ap.png")
    assert _count(per_class, BLUE, 0) > 500 and _count(per_class, ORANGE, 0) > 500
    assert _count(_png(out / "loss.png"), BLUE, 0) > 50
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]


def test_report_without_production_or_events_says_so(run, tmp_path):
    out = tmp_path / "report"
    build_report(out, run["eval"], run["records"], model_dir=run["model"], grid_images=1)
    assert (out / "loss.png").exists()
    summary = build_report(out, run["eval"], run["records"], model_dir=run["empty_model"],
                           grid_images=2)  # the same folder: replaced whole
    assert sorted(Path(p).name for p in summary["images"]) == ["per_class_ap.png",
                                                              "slices.png", "val_grid.png"]
    assert not (out / "loss.png").exists()
    page = Page((out / "report.html").read_text())
    assert "loss.png" not in page.images
    text = "".join(page.text)
    assert "no training loss curve" in text and "no gate decision given" in text
    assert page.row("AP") == ["AP", "0.600", "no production model", "—"]
    assert page.row("circle")[2] == "no production model"
    per_class = _png(out / "per_class_ap.png")
    assert _count(per_class, BLUE, 0) > 500 and _count(per_class, ORANGE, 0) == 0
    assert _png(out / "val_grid.png").shape[1] == 2 * 256  # two cells side by side


def test_report_command(run, tmp_path):
    out = tmp_path / "report"
    args = build_parser().parse_args([
        "report", "--metrics", str(run["eval"] / "metrics.json"), "--data", str(run["records"]),
        "--out", str(out), "--baseline-metrics", str(run["baseline"] / "metrics.json"),
        "--decision", str(run["decision"]), "--grid-images", "3"])
    summary = json.loads(json.dumps(args.func(args)))
    assert summary["report"] == str(out / "report.html") and summary["grid_images"] == 3
    assert summary["baseline"] is True and summary["classes"] == len(CLASSES)
    assert "no training loss curve" in (out / "report.html").read_text()  # no --model-dir


def test_losses_are_read_without_tensorflow_from_cut_and_resumed_event_files(run, tmp_path):
    """The report reads TF's event files itself (no TensorFlow import): every `*loss` tag,
    a file cut mid-record keeps what came before the cut, and a resumed run's later file
    wins for a step logged twice."""
    model = tmp_path / "model"
    _write_loss_events(model, steps=6)
    (first,) = (model / "train").iterdir()
    data = first.read_bytes()
    first.write_bytes(data[:-7])  # killed mid-write: the last record is cut short
    resumed = model / "train" / ("events.out.tfevents.9999999999." + first.name.split(".")[-1])
    resumed.write_bytes(data)  # the resumed run's file (here: the same steps again, whole)
    code = ("import json, sys; from odapi_operators.core.evaluation.report import read_losses; "
            "print(json.dumps(read_losses(sys.argv[1]))); "
            "print('tensorflow' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code, str(model)], check=True,
                          capture_output=True, text=True)
    losses, tensorflow_imported = done.stdout.splitlines()
    assert tensorflow_imported == "False"
    assert sorted(json.loads(losses)) == ["cls_loss", "total_loss"]
    total = json.loads(losses)["total_loss"]
    assert [step for step, _ in total] == [1, 2, 3, 4, 5, 6]
    assert total[0][1] == pytest.approx(3.2) and total[5][1] == pytest.approx(0.7)
    first.write_bytes(data[:len(data) // 2])
    resumed.unlink()
    cut = read_losses(model)["cls_loss"]  # the cut file alone: the steps before the cut
    assert 1 <= len(cut) < 6 and cut[0] == (1, pytest.approx(2.0))
