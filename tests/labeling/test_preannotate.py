"""Pre-annotation and active-learning selection, with a stand-in model (no TensorFlow).

The pool is the sample generator's export (real JPEGs with VOC truth); the stand-in model
"detects" exactly the truth boxes, so a task written from its proposals and accepted in
Prodigy / submitted in Label Studio must ingest back to the truth, within a pixel. The
TensorFlow paths (local SavedModel, TF Serving, the DAG) are in test_preannotate_models.py.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from odapi_operators.core.data import sample_data
from odapi_operators.core.data.ingest import ingest
from odapi_operators.core.data.label_map import format_label_map
from odapi_operators.core.data.manifest import key_from_url, read_manifest
from odapi_operators.core.labeling.pool import list_pool
from odapi_operators.core.labeling.preannotate import PreannotateOptions, preannotate
from odapi_operators.core.labeling.predictors import ModelRef
from odapi_operators.core.labeling.selection import (
    SelectionPolicy,
    disagreement,
    hamming,
    informativeness,
    pick_diverse,
    uncertainty,
)
from odapi_operators.core.labeling.sent_ledger import SentLedger
from odapi_operators.core.model.detector import Detections

LABELS = {name: index for index, name in enumerate(sample_data.CLASSES, start=1)}
EMPTY = Detections(np.zeros((0, 4)), np.zeros(0), np.zeros(0, dtype=int))


@dataclass
class StandInModel:
    """A 'model' answering from a table of detections by image content (sha256)."""

    table: dict[str, Detections]
    ref: ModelRef
    calls: list[int] = field(default_factory=list)

    def predict(self, images: list[bytes]) -> list[Detections]:
        self.calls.append(len(images))
        return [self.table.get(hashlib.sha256(i).hexdigest(), EMPTY) for i in images]

    def close(self) -> None:
        pass


def detections(boxes, scores, labels) -> Detections:
    return Detections(np.array(boxes, dtype=np.float64).reshape(-1, 4), np.array(scores),
                      np.array([LABELS[n] for n in labels], dtype=int))


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> dict:
    """8 sample images (the pool), their VOC truth, and a label map."""
    root = tmp_path_factory.mktemp("pool")
    sample_data.generate(root / "unlabeled", count=8, seed=5, max_side=96)
    ingest([str(root / "unlabeled")], root / "truth")
    truth = {r.key: r for r in read_manifest(root / "truth" / "manifest.jsonl")}
    label_map = root / "label_map.pbtxt"
    label_map.write_text(format_label_map(LABELS))
    return {"dir": root / "unlabeled", "truth": truth, "label_map": str(label_map)}


def truth_model(pool: dict, score=lambda key, index: 0.9, version: int = 3) -> StandInModel:
    """Proposes the truth boxes; `score(key, box index)` sets each box's score."""
    table = {}
    for key, record in pool["truth"].items():
        data = (pool["dir"] / f"{key}.jpg").read_bytes()
        table[hashlib.sha256(data).hexdigest()] = detections(
            [[b.ymin, b.xmin, b.ymax, b.xmax] for b in record.boxes],
            [score(key, i) for i in range(len(record.boxes))], [b.label for b in record.boxes])
    return StandInModel(table, ModelRef("shapes", version, label_map=pool["label_map"]))


def assert_within_a_pixel(got, truth) -> None:
    def pixels(record):
        return sorted((b.label, b.xmin * truth.width, b.ymin * truth.height,
                       b.xmax * truth.width, b.ymax * truth.height) for b in record.boxes)

    assert [p[0] for p in pixels(got)] == [p[0] for p in pixels(truth)]
    for g, t in zip(pixels(got), pixels(truth)):
        assert np.abs(np.array(g[1:]) - np.array(t[1:])).max() <= 1.0


def write_jsonl(path: Path, lines: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def accepted_prodigy(tasks_file: Path, out: Path) -> Path:
    """What `prodigy db-out` gives after the annotator accepted every task as proposed."""
    lines = [json.loads(line) for line in tasks_file.read_text().splitlines()]
    return write_jsonl(out, [{**task, "answer": "accept", "_input_hash": i,
                              "_task_hash": -i - 1, "_view_id": "image_manual"}
                             for i, task in enumerate(lines)])


def submitted_labelstudio(tasks_file: Path, out: Path) -> Path:
    """A Label Studio export after the annotator submitted every prediction unchanged."""
    tasks = json.loads(tasks_file.read_text())
    exported = []
    for i, task in enumerate(tasks):
        prediction = {**task["predictions"][0], "id": 500 + i}
        exported.append({"id": 100 + i, "data": task["data"], "predictions": [prediction],
                         "annotations": [{"id": 900 + i, "result": prediction["result"],
                                          "was_cancelled": False, "ground_truth": False,
                                          "parent_prediction": 500 + i}]})
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(exported))
    return out


def run(pool: dict, out: Path, model: StandInModel, **options) -> dict:
    kwargs = {k: options.pop(k) for k in ("candidate", "labeled", "sent_ledger")
              if k in options}
    return preannotate(str(pool["dir"]), out, model, options=PreannotateOptions(**options),
                       **kwargs)


# ---------------------------------------------------------------- round trips through ingest

@pytest.mark.parametrize("inline", [True, False], ids=["data-uri", "path"])
def test_accepted_prodigy_tasks_ingest_to_the_same_boxes(pool, tmp_path, inline):
    summary = run(pool, tmp_path / "batch", truth_model(pool), inline_images=inline)
    assert summary["selected"] == 8 and summary["model_version"] == "shapes/3"
    tasks = [json.loads(l) for l in (tmp_path / "batch" / "tasks.jsonl").read_text().splitlines()]
    first = tasks[0]
    assert first["image"].startswith("data:image/jpeg;base64,") == inline
    assert first["meta"]["model_version"] == "shapes/3" and "score" in first["meta"]
    assert len(first["spans"][0]["points"]) == 4 and {"x", "y", "width", "height", "score",
                                                      "label"} <= set(first["spans"][0])

    export = accepted_prodigy(tmp_path / "batch" / "tasks.jsonl", tmp_path / "db-out" / "a.jsonl")
    result = ingest([str(export.parent)], tmp_path / "ingest", images_root=str(pool["dir"]))
    assert result["rejected"] == 0 and result["images"] == 8
    records = list(read_manifest(tmp_path / "ingest" / "manifest.jsonl"))
    by_key = {}
    for record in records:
        assert record.provenance["model_version"] == "shapes/3"
        key = record.key if not inline else next(  # inline images are keyed by content
            k for k in pool["truth"] if (pool["dir"] / f"{k}.jpg").read_bytes()
            == Path(record.source.uri).read_bytes())
        by_key[key] = record
    assert sorted(by_key) == sorted(pool["truth"])
    for key, record in by_key.items():
        assert_within_a_pixel(record, pool["truth"][key])


def test_submitted_labelstudio_tasks_ingest_to_the_same_boxes(pool, tmp_path):
    run(pool, tmp_path / "batch", truth_model(pool), fmt="labelstudio")
    tasks = json.loads((tmp_path / "batch" / "tasks.json").read_text())
    prediction = tasks[0]["predictions"][0]
    assert tasks[0]["data"]["image"].startswith("/data/local-files/?d=shapes_")
    assert prediction["model_version"] == "shapes/3"
    assert {"type", "from_name", "to_name", "original_width", "original_height", "value",
            "score"} <= set(prediction["result"][0])
    assert prediction["result"][0]["value"]["rotation"] == 0

    export = submitted_labelstudio(tmp_path / "batch" / "tasks.json", tmp_path / "ls" / "x.json")
    result = ingest([str(export)], tmp_path / "ingest", images_root=str(pool["dir"]))
    assert result["rejected"] == 0 and result["images"] == 8
    records = {r.key: r for r in read_manifest(tmp_path / "ingest" / "manifest.jsonl")}
    assert sorted(records) == sorted(pool["truth"])  # same keys as the pool's own
    for key, record in records.items():
        assert record.provenance["model_version"] == "shapes/3"
        assert_within_a_pixel(record, pool["truth"][key])


def test_threshold_and_max_boxes_limit_the_proposals(pool, tmp_path):
    model = truth_model(pool, score=lambda key, i: [0.9, 0.5, 0.25, 0.8][i % 4])
    run(pool, tmp_path / "batch", model, score_threshold=0.3, max_boxes=2)
    for line in (tmp_path / "batch" / "tasks.jsonl").read_text().splitlines():
        scores = [span["score"] for span in json.loads(line)["spans"]]
        assert len(scores) <= 2 and all(s >= 0.3 for s in scores)
        assert scores == sorted(scores, reverse=True)


# ---------------------------------------------------------------- selection

def borderline_model(pool: dict) -> StandInModel:
    """Each image gets its own mix of confident and borderline scores."""
    keys = sorted(pool["truth"])
    return truth_model(pool, score=lambda key, i: [0.95, 0.45, 0.3, 0.9, 0.55, 0.25, 0.6,
                                                   0.2][(keys.index(key) + i) % 8])


def selected_keys(out: Path) -> list[str]:
    lines = [json.loads(l) for l in (out / "scores.jsonl").read_text().splitlines()]
    return [l["key"] for l in lines if l["status"] == "selected"]


def test_selection_is_deterministic_and_ranked_by_informativeness(pool, tmp_path):
    first = run(pool, tmp_path / "a" / "batch", borderline_model(pool), top_k=3)
    second = run(pool, tmp_path / "b" / "batch", borderline_model(pool), top_k=3, batch_size=3)
    assert first["selected"] == second["selected"] == 3
    assert selected_keys(tmp_path / "a" / "batch") == selected_keys(tmp_path / "b" / "batch")
    assert (tmp_path / "a" / "batch" / "scores.jsonl").read_text() == \
        (tmp_path / "b" / "batch" / "scores.jsonl").read_text()
    lines = [json.loads(l) for l in (tmp_path / "a" / "batch" / "scores.jsonl").read_text()
             .splitlines()]
    assert [l["rank"] for l in lines] == list(range(1, 9))
    assert [l["score"] for l in lines] == sorted((l["score"] for l in lines), reverse=True)
    assert [l["status"] for l in lines[:3]] == ["selected"] * 3
    tasks = [json.loads(l) for l in (tmp_path / "a" / "batch" / "tasks.jsonl").read_text()
             .splitlines()]
    assert [t["meta"]["key"] for t in tasks] == selected_keys(tmp_path / "a" / "batch")


def test_sent_images_are_never_sent_again_and_labeled_ones_are_skipped(pool, tmp_path):
    model = borderline_model(pool)
    ledger_path = tmp_path / "sent-shapes.jsonl"
    first = run(pool, tmp_path / "b1", model, top_k=3)
    assert first["sent_ledger"] == str(ledger_path)  # default: beside the batch folder
    sent_first = selected_keys(tmp_path / "b1")
    assert [r["key"] for r in SentLedger(ledger_path).records("shapes")] == sent_first

    labeled = tmp_path / "labeled" / "manifest.jsonl"  # two other images got labeled
    others = [k for k in sorted(pool["truth"]) if k not in sent_first][:2]
    labeled.parent.mkdir()
    labeled.write_text("".join(pool["truth"][k].to_json() + "\n" for k in others))
    calls = len(model.calls)
    second = run(pool, tmp_path / "b2", model, labeled=[str(labeled)])
    assert second["skipped"] == {"sent": 3, "labeled": 2, "near_duplicate": 0}
    assert second["scored"] == second["selected"] == 3
    assert not set(selected_keys(tmp_path / "b2")) & set(sent_first + others)
    assert sum(model.calls[calls:]) == 3  # skipped images never reach the model

    third = run(pool, tmp_path / "b3", model)
    assert third["selected"] == 2 and third["skipped"]["sent"] == 6  # the labeled ones remain
    keys = [r["key"] for r in SentLedger(ledger_path).records("shapes")]
    assert len(keys) == len(set(keys)) == 8


def test_a_retried_batch_gets_its_own_images_back(pool, tmp_path):
    model = borderline_model(pool)
    run(pool, tmp_path / "b1", model, top_k=3)
    again = run(pool, tmp_path / "b1", model, top_k=3)  # e.g. the task retried
    assert again["selected"] == 3 and again["skipped"]["sent"] == 0
    assert len(SentLedger(tmp_path / "sent-shapes.jsonl").records()) == 3


def test_near_duplicates_are_sent_once(pool, tmp_path):
    folder = tmp_path / "pool"
    folder.mkdir()
    names = sorted(pool["truth"])[:3]
    for name in names:
        data = (pool["dir"] / f"{name}.jpg").read_bytes()
        (folder / f"{name}.jpg").write_bytes(data)
        with Image.open(io.BytesIO(data)) as image:  # the same frame again, re-encoded
            image.point(lambda v: min(255, v + 3)).save(folder / f"{name}_copy.jpg", "JPEG",
                                                          quality=70)
    model = truth_model(pool)
    out = tmp_path / "batch"
    summary = preannotate(str(folder), out, model, options=PreannotateOptions(top_k=6))
    assert summary["scored"] == 6 and summary["selected"] == 3
    assert summary["skipped"]["near_duplicate"] == 3
    lines = [json.loads(l) for l in (out / "scores.jsonl").read_text().splitlines()]
    by_key = {l["key"]: l for l in lines}
    for name in names:  # one of each pair, and the pair's hashes are close
        assert {by_key[name]["status"], by_key[f"{name}_copy"]["status"]} == {
            "selected", "near_duplicate"}
        assert hamming(int(by_key[name]["dhash"], 16), int(by_key[f"{name}_copy"]["dhash"], 16)
                       ) <= SelectionPolicy().max_hamming
    distinct = [int(by_key[n]["dhash"], 16) for n in names]
    assert min(hamming(a, b) for i, a in enumerate(distinct) for b in distinct[i + 1:]) > 12

    later = preannotate(str(folder), tmp_path / "batch2", model, options=PreannotateOptions())
    assert later["selected"] == 0 and later["skipped"]["near_duplicate"] == 3  # of sent ones


def test_came_back_labeled_counts_sent_images_in_a_label_export(pool, tmp_path):
    model = truth_model(pool)
    run(pool, tmp_path / "b1", model, top_k=3, fmt="labelstudio")
    export = submitted_labelstudio(tmp_path / "b1" / "tasks.json", tmp_path / "ls" / "e.json")
    tasks = json.loads(export.read_text())
    tasks[2]["annotations"][0]["was_cancelled"] = True  # one came back unlabeled
    export.write_text(json.dumps(tasks))
    summary = run(pool, tmp_path / "b2", model, top_k=2, labeled=[str(export.parent)])
    assert summary["came_back"]["sent"] == 5
    assert summary["came_back"]["labeled"] == 2
    assert summary["came_back"]["batches"][str(tmp_path / "b1")] == {"sent": 3, "labeled": 2}
    assert summary["skipped"] == {"sent": 3, "labeled": 0, "near_duplicate": 0}


def test_disagreement_with_a_candidate_ranks_first(pool, tmp_path):
    production = truth_model(pool)
    candidate = truth_model(pool, version=4)
    flipped = sorted(pool["truth"])[5]
    record = pool["truth"][flipped]
    data = (pool["dir"] / f"{flipped}.jpg").read_bytes()
    labels = [{"circle": "square", "square": "triangle", "triangle": "circle"}[b.label]
              for b in record.boxes]
    candidate.table[hashlib.sha256(data).hexdigest()] = detections(
        [[b.ymin, b.xmin, b.ymax, b.xmax] for b in record.boxes], [0.9] * len(labels), labels)
    summary = run(pool, tmp_path / "batch", production, candidate=candidate, top_k=1)
    assert summary["candidate"] == "shapes/4"
    assert selected_keys(tmp_path / "batch") == [flipped]
    top = json.loads((tmp_path / "batch" / "scores.jsonl").read_text().splitlines()[0])
    assert top["flipped"] == len(labels) and top["disagreement"] == 1.0


# ---------------------------------------------------------------- pools

def test_url_and_gs_pools_use_the_fetcher(pool, tmp_path, gcs_with_preconditions):
    from odapi_operators.core import storage

    from support.image_server import ImageServer, send

    keys = sorted(pool["truth"])
    model = truth_model(pool)
    with ImageServer() as server:
        for key in keys[:3]:
            server.routes[f"/img/{key}.jpg"] = send((pool["dir"] / f"{key}.jpg").read_bytes())
        server.routes["/img/gone.jpg"] = send(b"<html>404</html>", 404, "text/html")
        urls = [server.url(f"/img/{k}.jpg") for k in keys[:3]] + [server.url("/img/gone.jpg")]
        listing = tmp_path / "urls.txt"
        listing.write_text("# the next batch\n" + "\n".join(urls) + "\n")
        summary = run({**pool, "dir": listing}, tmp_path / "batch", model, fmt="labelstudio")
        again = run({**pool, "dir": listing}, tmp_path / "batch2", model)
    assert summary["scored"] == 3 and summary["failed"] == 1
    assert "HTTP 404" in summary["failures"][0]
    tasks = json.loads((tmp_path / "batch" / "tasks.json").read_text())
    assert [t["data"]["image"] for t in tasks] == sorted(
        urls[:3], key=lambda u: key_from_url(u))  # URLs as they are
    assert again["skipped"]["sent"] == 3

    prefix = f"{gcs_with_preconditions}/pool"
    for key in keys[3:5]:
        storage.write_bytes(f"{prefix}/{key}.jpg", (pool["dir"] / f"{key}.jpg").read_bytes())
    storage.write_text(f"{prefix}/notes.txt", "not an image")
    ledger = f"{gcs_with_preconditions}/state/sent-shapes.jsonl"
    on_gs = preannotate(prefix, tmp_path / "gs-batch", model, sent_ledger=ledger,
                        options=PreannotateOptions(fmt="labelstudio"))
    assert on_gs["scored"] == 2 and on_gs["selected"] == 2
    assert {t["data"]["image"] for t in json.loads((tmp_path / "gs-batch" / "tasks.json")
                                                   .read_text())} == {
        f"{prefix}/{k}.jpg" for k in keys[3:5]}
    assert len(SentLedger(ledger).records("shapes")) == 2
    assert preannotate(prefix, tmp_path / "gs-batch2", model, sent_ledger=ledger)[
        "skipped"]["sent"] == 2


def test_list_file_paths_stay_inside_its_folder(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"x")
    listing = tmp_path / "list.txt"
    listing.write_text("a.jpg\n../etc/passwd.jpg\n/abs/b.jpg\nftp://host/c.jpg\na.jpg\n")
    found = list_pool(listing)
    assert [r.key for r in found.records] == ["a"]
    reasons = [r.reason.split(":")[0] for r in found.rejected.items]
    assert reasons == ["path outside the allowed root", "absolute path refused",
                       "unsupported image location", "duplicate image"]


# ---------------------------------------------------------------- scores

def test_uncertainty_disagreement_and_diversity_units():
    policy = SelectionPolicy()
    sure = uncertainty([0.99, 0.98], policy.band)
    unsure = uncertainty([0.5, 0.4, 0.3], policy.band)
    assert sure["borderline"] == 0 and unsure["borderline"] == 3
    assert unsure["uncertainty"] > sure["uncertainty"]
    assert uncertainty([], policy.band)["uncertainty"] == 1.0  # nothing found at all

    box = [0.1, 0.1, 0.5, 0.5]
    a = Detections(np.array([box, [0.6, 0.6, 0.9, 0.9]]), np.array([0.9, 0.8]), np.array([1, 2]))
    same = disagreement(a, a, 0.3, 0.5)
    assert same == {"unmatched": 0, "flipped": 0, "disagreement": 0.0}
    shifted = Detections(np.array([[0.12, 0.1, 0.52, 0.5]]), np.array([0.9]), np.array([3]))
    other = disagreement(a, shifted, 0.3, 0.5)
    assert other == {"unmatched": 1, "flipped": 1, "disagreement": 1.0}
    assert informativeness(a, shifted, 0.3, policy)["score"] > \
        informativeness(a, a, 0.3, policy)["score"]

    items = [("a", 0b0), ("b", 0b111), ("c", 0xFFFF), ("d", 0xFFFF0000)]
    chosen, skipped = pick_diverse(items, 3, lambda i: i[1], seen=[0xFFFFFFFF00000000],
                                   max_hamming=6)
    assert [c[0] for c in chosen] == ["a", "c", "d"] and [s[0] for s in skipped] == ["b"]
