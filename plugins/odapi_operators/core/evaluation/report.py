"""Run report (child process): one self-contained HTML page per run, with its PNGs.

It reads what earlier stages left behind: the evaluator's `metrics.json`, `detections.json` and
`ground_truth.json` (candidate, and production when there is one), the gate's `decision.json`
(its per-slice deltas with bootstrap intervals),
TF-Vision's TensorBoard events under `<model_dir>/train/` and the val TFRecords. A person
deciding whether to trust the run needs all of it on one page. Text from data (class names
are user input) is HTML-escaped. The folder is written whole with `storage.atomic_directory`:
a reader sees the previous report or the new one, never half of one.
"""

from __future__ import annotations

import html
import io
import json
import math
import os
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any, Iterable, Iterator

from odapi_operators.core import storage
from odapi_operators.core.data.tfrecord import RecordFramingError, decode_example, read_records
from odapi_operators.core.layout import METRICS, REPORT_PAGE
from odapi_operators.core.model.tfvision import val_examples

METRIC_ROWS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "ARmax100", "eval_images")
NO_PRODUCTION = "no production model"
PER_CLASS_PNG, LOSS_PNG, GRID_PNG = "per_class_ap.png", "loss.png", "val_grid.png"
SLICES_PNG = "slices.png"
SLICE_METRICS = ("AP50", "AP")
GROUND_TRUTH_COLOUR, PREDICTION_COLOUR = (0, 255, 0), (255, 0, 0)
CELL = 256  # grid cell side in pixels; small images are scaled up so boxes stay readable
CAPTION = 16
GRID_COLUMNS = 4

Series = dict[str, list[tuple[int, float]]]

STYLE = """
body{font-family:sans-serif;margin:2em;max-width:72em}
table{border-collapse:collapse;margin:.5em 0 1.5em}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th:first-child,td:first-child{text-align:left}
.promoted{color:#070}.rejected{color:#a00}.note{color:#666;font-style:italic}
img{max-width:100%;border:1px solid #ddd}
"""


def _file(folder: str | Path, name: str) -> str:
    """`folder/name`, keeping a `gs://` prefix intact (Path would fold its double slash)."""
    return f"{os.fspath(folder).rstrip('/')}/{name}"


def _read_json(path: str | Path) -> Any:
    return json.loads(storage.read_text(path))


def _number(value: Any) -> float | None:
    """A finite, non-negative metric value; None for missing, NaN and COCO's -1 (no truth)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) and value >= 0 else None


def _format(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.3f}" if math.isfinite(value) else "n/a"
    return str(value)


def _metric(value: Any) -> str:
    """A COCO metric: -1 (no ground truth) and non-finite values read "n/a"."""
    if isinstance(value, (int, float)) and _number(value) is None:
        return "n/a"
    return _format(value)


def _delta(candidate: Any, production: Any) -> str:
    a, b = _number(candidate), _number(production)
    if a is None or b is None:
        return "—"
    if isinstance(candidate, int) and isinstance(production, int):
        return f"{candidate - production:+d}"
    return f"{a - b:+.3f}"


def comparison_rows(names: Iterable[str], candidate: dict, production: dict | None
                    ) -> list[list[str]]:
    """[name, candidate, production, delta] per name; production says when there is none."""
    rows = []
    for name in names:
        value = candidate.get(name)
        if production is None:
            rows.append([name, _metric(value), NO_PRODUCTION, "—"])
        else:
            base = production.get(name)
            rows.append([name, _metric(value), _metric(base), _delta(value, base)])
    return rows


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    head = f"<thead><tr>{head}</tr></thead>" if any(headers) else ""
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>"
                   for row in rows)
    return f"<table>{head}<tbody>{body}</tbody></table>"


def _note(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'


def _figure(name: str, alt: str) -> str:
    return f'<p><img src="{html.escape(name)}" alt="{html.escape(alt)}"></p>'


def decision_section(decision: dict) -> str:
    """Promoted or not, the rule and reason, and every check with value, bound and verdict."""
    promoted = bool(decision.get("promoted"))
    verdict, css = ("promoted", "promoted") if promoted else ("not promoted", "rejected")
    lines = [f'<p class="{css}"><strong>{verdict}</strong> '
             f"(rule: {html.escape(str(decision.get('rule')))})</p>",
             f"<p>{html.escape(str(decision.get('reason', '')))}</p>"]
    if decision.get("forced"):
        force = decision.get("force") or {}
        lines.append(_note(f"forced by {force.get('by') or 'unknown'}: {force.get('reason')}"))
    rows = [[c.get("check", ""), _format(c.get("value")),
             f"{c.get('op', '')} {c.get('bound')}".strip(),  # the bound as configured
             _format(c.get("baseline")), c.get("verdict", ""), c.get("note", "")]
            for c in decision.get("checks", [])]
    lines.append(_table(["check", "value", "bound", "production", "verdict", "note"], rows)
                 if rows else _note("no checks were run"))
    return "\n".join(lines)


def read_losses(model_dir: str | Path) -> Series:
    """Every `*loss` scalar in `<model_dir>/train/` event files: tag -> [(step, value)].

    TF2 summaries store scalars as tensors, TF1 ones as simple_value; both are read. A file cut
    short (training killed mid-write) contributes what was read before the cut. A step logged
    twice (a resumed run) keeps the later file's value.
    """
    series: dict[str, dict[int, float]] = defaultdict(dict)
    for path in storage.list_files(f"{model_dir}/train"):
        if path.rsplit("/", 1)[-1].startswith("events.out.tfevents."):
            with storage.open_read(path) as stream:
                for tag, step, number in _loss_scalars(stream):
                    series[tag][step] = number
    return {tag: sorted(points.items()) for tag, points in sorted(series.items())}


def _loss_scalars(stream: IO[bytes]) -> Iterator[tuple[str, int, float]]:
    """(tag, step, value) of every single-number `*loss` summary in one event file, up to
    where its framing breaks; a damaged record alone is skipped."""
    from tensorboard.compat.proto.event_pb2 import Event  # no TensorFlow: ~0.4 s, not ~5
    from tensorboard.util.tensor_util import make_ndarray

    try:
        for _, raw in read_records(stream):
            event = Event.FromString(raw) if raw is not None else Event()
            for value in event.summary.value:
                if not value.tag.endswith("loss"):
                    continue
                if not value.HasField("tensor"):
                    yield value.tag, int(event.step), float(value.simple_value)
                elif (array := make_ndarray(value.tensor)).size == 1:
                    yield value.tag, int(event.step), float(array.reshape(-1)[0])
    except RecordFramingError:
        return


def plot_losses(losses: Series, path: Path) -> None:
    """One line per loss tag over training steps."""
    from matplotlib.figure import Figure  # renders PNG with Agg; no pyplot global state

    figure = Figure(figsize=(8, 4), dpi=100)
    axes = figure.subplots()
    for tag, points in losses.items():
        steps, values = zip(*points)
        axes.plot(steps, values, marker="." if len(points) < 50 else None, label=tag)
    axes.set(xlabel="step", ylabel="loss", title="training loss")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, format="png")


def plot_per_class(candidate: dict, production: dict | None, path: Path) -> None:
    """Horizontal bars of per-class AP; candidate and production side by side. n/a shows 0."""
    from matplotlib.figure import Figure

    names = sorted(set(candidate) | set(production or {}))
    sides = [("candidate", candidate, "tab:blue")]
    if production is not None:
        sides.append(("production", production, "tab:orange"))
    height = 0.8 / len(sides)
    figure = Figure(figsize=(8, 1.5 + 0.4 * len(names) * len(sides)), dpi=100)
    axes = figure.subplots()
    for index, (label, values, colour) in enumerate(sides):
        positions = [row + (index - (len(sides) - 1) / 2) * height for row in range(len(names))]
        numbers = [_number(values.get(name)) for name in names]
        bars = axes.barh(positions, [n or 0.0 for n in numbers], height=height, color=colour,
                         label=label)
        axes.bar_label(bars, labels=[_metric(values.get(name)) for name in names],
                       padding=2, fontsize=8)
    axes.set_yticks(range(len(names)), labels=names, parse_math=False)  # names are user input
    axes.invert_yaxis()
    axes.set(xlabel="AP (COCO, IoU .50:.95)", xlim=(0, 1.1), title="per-class AP")
    axes.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path, format="png")


def _decode(example: bytes) -> tuple[int, Any]:
    """(COCO image id, RGB PIL image) of one serialized tf.train.Example."""
    from PIL import Image

    features = decode_example(example)
    source_id = int(features["image/source_id"][0])
    return source_id, Image.open(io.BytesIO(features["image/encoded"][0])).convert("RGB")


def _draw_cell(image: Any, image_id: int, truth: list[dict], predictions: list[dict],
               names: dict[int, str]) -> Any:
    """One grid cell: the image scaled to fit, truth boxes green, predictions red + label."""
    from PIL import Image, ImageDraw, ImageFont

    scale = min(CELL / image.width, CELL / image.height)
    shown = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))))
    cell = Image.new("RGB", (CELL, CELL + CAPTION), "black")
    cell.paste(shown, (0, 0))
    draw, font = ImageDraw.Draw(cell), ImageFont.load_default(size=11)

    def box(item: dict) -> list[float]:
        x, y, w, h = (v * scale for v in item["bbox"])
        return [x, y, x + w, y + h]

    for item in truth:
        draw.rectangle(box(item), outline=GROUND_TRUTH_COLOUR, width=2)
    for item in predictions:
        corners = box(item)
        draw.rectangle(corners, outline=PREDICTION_COLOUR, width=2)
        text = f"{names.get(item['category_id'], item['category_id'])} {item['score']:.2f}"
        left, top, right, bottom = draw.textbbox((corners[0], corners[1]), text, font=font)
        label_top = max(0, corners[1] - (bottom - top) - 2)
        draw.rectangle([left, label_top, right + 2, label_top + bottom - top + 2],
                       fill=PREDICTION_COLOUR)
        draw.text((left + 1, label_top), text, fill="white", font=font)
    draw.text((2, CELL + 2), f"image {image_id}", fill="white", font=font)
    return cell


def draw_grid(examples: list[bytes], ground_truth: dict, detections: list[dict],
              score_threshold: float, path: Path) -> int:
    """Tile the examples with their boxes into one PNG; return the number of images drawn."""
    from PIL import Image

    names = {c["id"]: c["name"] for c in ground_truth.get("categories", [])}
    truth, predicted = defaultdict(list), defaultdict(list)
    for item in ground_truth.get("annotations", []):
        truth[item["image_id"]].append(item)
    for item in detections:
        if item["score"] >= score_threshold:
            predicted[item["image_id"]].append(item)
    cells = [_draw_cell(image, image_id, truth[image_id], predicted[image_id], names)
             for image_id, image in map(_decode, examples)]
    columns = min(GRID_COLUMNS, len(cells))
    rows = math.ceil(len(cells) / columns)
    grid = Image.new("RGB", (columns * CELL, rows * (CELL + CAPTION)), "white")
    for index, cell in enumerate(cells):
        grid.paste(cell, (index % columns * CELL, index // columns * (CELL + CAPTION)))
    grid.save(path, format="PNG")
    return len(cells)


def plot_slices(comparison: dict[str, dict], path: Path, metric: str = "AP50") -> None:
    """Per slice: candidate and production bars (left), and the delta with its bootstrap
    interval as whiskers (right). A slice without images or numbers draws no bar."""
    from matplotlib.figure import Figure

    names = list(comparison)
    figure = Figure(figsize=(10, 3.5), dpi=100)
    values, deltas = figure.subplots(1, 2)
    width = 0.4
    for offset, side, colour in ((-width / 2, "candidate", "tab:blue"),
                                 (width / 2, "production", "tab:orange")):
        numbers = [_number((comparison[n].get(metric) or {}).get(side)) for n in names]
        bars = values.bar([i + offset for i in range(len(names))], [v or 0.0 for v in numbers],
                          width=width, color=colour, label=side)
        values.bar_label(bars, labels=[_metric(v) for v in numbers], padding=2, fontsize=8)
    values.set_xticks(range(len(names)), labels=[f"{n} ({comparison[n].get('images') or 0})"
                                                 for n in names])
    values.set(ylim=(0, 1.1), ylabel=metric, title=f"{metric} per slice (val images)")
    values.legend(loc="upper right", fontsize=8)
    numbers = [(comparison[n].get(metric) or {}) for n in names]
    delta = [d.get("delta") if isinstance(d.get("delta"), (int, float)) else 0.0
             for d in numbers]
    low = [max(0.0, v - d["interval"][0]) if d.get("interval") else 0.0
           for v, d in zip(delta, numbers)]
    high = [max(0.0, d["interval"][1] - v) if d.get("interval") else 0.0
            for v, d in zip(delta, numbers)]
    colours = ["tab:green" if v >= 0 else "tab:red" for v in delta]
    deltas.bar(range(len(names)), delta, color=colours, yerr=[low, high], capsize=6,
               error_kw={"elinewidth": 1.5})
    deltas.axhline(0, color="black", linewidth=0.8)
    deltas.set_xticks(range(len(names)), labels=names)
    deltas.set(ylabel=f"{metric} delta", title="candidate - production (whiskers: interval)")
    figure.tight_layout()
    figure.savefig(path, format="png")


def _interval(numbers: dict) -> str:
    interval = numbers.get("interval")
    return f"[{interval[0]:+.3f}, {interval[1]:+.3f}]" if interval else "—"


def slices_section(metrics: dict, baseline: dict | None, decision: dict | None,
                   folder: Path) -> str:
    """Candidate and production side by side per slice, with the gate's bootstrap intervals
    (when it computed them) as a table and as whiskers on per-slice bars."""
    from odapi_operators.core.evaluation.gate import compare_slices

    comparison = (decision or {}).get("slices") or compare_slices(metrics, baseline)
    if not comparison:
        return _note("the metrics have no slices")
    rows = []
    for name, seen in comparison.items():
        for metric in SLICE_METRICS:
            numbers = seen.get(metric) or {}
            production = (NO_PRODUCTION if baseline is None
                          else _metric(numbers.get("production")))
            rows.append([name, _format(seen.get("images")), metric,
                         _metric(numbers.get("candidate")), production,
                         _delta(numbers.get("candidate"), numbers.get("production")),
                         _interval(numbers)])
    confidence = ((decision or {}).get("policy") or {}).get("bootstrap", {}).get(
        "confidence", 0.95)
    notes = "".join(_note(f"{name}: {seen['note']}") for name, seen in comparison.items()
                    if seen.get("note"))
    if "new" not in comparison:
        notes += _note("evaluated without a dataset diff: no new/old slices")
    plot_slices(comparison, folder / SLICES_PNG)
    return (_table(["slice", "images", "metric", "candidate", "production", "delta",
                    f"{confidence:.0%} interval"], rows)
            + _note("new: val images added or changed in this dataset version; old: the "
                    "others; intervals: paired bootstrap over the slice's images")
            + notes + _figure(SLICES_PNG, "per-slice metrics with intervals"))


def _run_info(metrics: dict, baseline: dict | None, paths: dict[str, Any]) -> str:
    def model(m: dict) -> str:
        return f"{m.get('model', '—')} ({m.get('model_kind', '?')})"

    rows = [["candidate model", model(metrics)],
            ["production model", model(baseline) if baseline is not None else NO_PRODUCTION]]
    rows += [[name, str(value)] for name, value in paths.items() if value is not None]
    rows.append(["generated", datetime.now(timezone.utc).isoformat(timespec="seconds")])
    return _table(["", ""], rows)


def _per_class_section(candidate: dict, production: dict | None, folder: Path) -> str:
    if not candidate:
        return _note("the metrics have no per-class AP")
    plot_per_class(candidate, production, folder / PER_CLASS_PNG)
    names = sorted(set(candidate) | set(production or {}))
    return (_table(["class", "candidate AP", "production AP", "delta"],
                   comparison_rows(names, candidate, production))
            + _figure(PER_CLASS_PNG, "per-class AP"))


def _loss_section(model_dir: str | Path | None, folder: Path) -> str:
    losses = read_losses(model_dir) if model_dir is not None else {}
    if not losses:
        where = f"under {model_dir}/train/" if model_dir is not None else "no model dir given"
        return _note(f"no training loss curve: no loss events found ({where})")
    plot_losses(losses, folder / LOSS_PNG)
    return _figure(LOSS_PNG, "training loss")


def _grid_section(eval_dir: str | Path, examples: list[bytes], score_threshold: float,
                  folder: Path) -> str:
    if not examples:
        return _note("no validation images drawn")
    drawn = draw_grid(examples, _read_json(_file(eval_dir, "ground_truth.json")),
                      _read_json(_file(eval_dir, "detections.json")), score_threshold,
                      folder / GRID_PNG)
    return (_note(f"the first {drawn} validation images; green: ground truth, red: "
                  f"predictions with score >= {score_threshold}")
            + _figure(GRID_PNG, "validation images with boxes"))


def _page(title: str, sections: dict[str, str]) -> str:
    body = "\n".join(f"<h2>{html.escape(heading)}</h2>\n{content}"
                     for heading, content in sections.items())
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>{html.escape(title)}</title><style>{STYLE}</style></head>\n"
            f"<body><h1>{html.escape(title)}</h1>\n{body}\n</body></html>\n")


def build_report(out_dir: str | Path, eval_dir: str | Path, data_dir: str | Path,
                 model_dir: str | Path | None = None,
                 baseline_eval_dir: str | Path | None = None, decision: str | Path | None = None,
                 grid_images: int = 12, score_threshold: float = 0.3,
                 title: str | None = None) -> dict:
    """Write `<out_dir>/report.html` and its PNGs (replacing `out_dir` whole); return a summary.

    Without `model_dir` or its train events there is no loss curve, without
    `baseline_eval_dir` no production column, without `decision` no gate section: the page
    says so instead of failing. Grid images are the first `grid_images` val records.
    """
    metrics = _read_json(_file(eval_dir, METRICS))
    baseline = (_read_json(_file(baseline_eval_dir, METRICS))
                if baseline_eval_dir is not None else None)
    gate = _read_json(decision) if decision is not None else None
    examples = val_examples(data_dir, grid_images) if grid_images > 0 else []
    per_class = metrics.get("per_class") or {}
    out = Path(out_dir)
    with storage.atomic_directory(out) as tmp:
        sections = {
            "Run": _run_info(metrics, baseline, {
                "eval dir": eval_dir, "production eval dir": baseline_eval_dir,
                "data dir": data_dir, "model dir": model_dir, "decision": decision}),
            "Metrics: candidate vs production": _table(
                ["metric", "candidate", "production", "delta"],
                comparison_rows(METRIC_ROWS, metrics, baseline)),
            "Slices: candidate vs production": slices_section(metrics, baseline, gate, tmp),
            "Gate decision": (decision_section(gate) if gate is not None
                              else _note("no gate decision given")),
            "Per-class AP": _per_class_section(
                per_class, (baseline.get("per_class") or {}) if baseline is not None else None,
                tmp),
            "Training loss": _loss_section(model_dir, tmp),
            "Validation images": _grid_section(eval_dir, examples, score_threshold, tmp),
        }
        page = _page(title or "odapi run report", sections)
        (tmp / REPORT_PAGE).write_text(page, encoding="utf-8")
        images = [str(out / p.name) for p in sorted(tmp.glob("*.png"))]
    return {"report": str(out / REPORT_PAGE), "images": images,
            "eval_images": metrics.get("eval_images"), "classes": len(per_class),
            "grid_images": len(examples), "baseline": baseline is not None,
            "promoted": gate.get("promoted") if gate is not None else None}
