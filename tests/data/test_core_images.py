"""fetch + verify: resumable copies, full-decode integrity checks, RGB conversion, quarantine."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
from PIL import Image

from odapi_operators.core.data import sample_data
from odapi_operators.core.data.fetch import fetch_images
from odapi_operators.core.data.ingest import ingest
from odapi_operators.core.data.manifest import (
    Box,
    ImageRecord,
    ImageSource,
    key_from_path,
    read_manifest,
    write_manifest,
)
from odapi_operators.core.data.verify import check_image, verify_images
from odapi_operators.core.rejections import StageError


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def record(key: str, path: Path, size=(64, 48), boxes: int = 1) -> ImageRecord:
    return ImageRecord(
        key=key, source=ImageSource("local", str(path)), source_id=f"{key}.src",
        width=size[0], height=size[1],
        boxes=tuple(Box("thing", 0.1 * i / boxes, 0.1, 0.2 + 0.1 * i / boxes, 0.5)
                    for i in range(boxes)),
        provenance={"format": "voc", "file": f"/annotations/{key}.xml"})


def noise(size=(64, 48), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def jpeg_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=95)
    return buf.getvalue()


# --- fetch -------------------------------------------------------------------------------

@pytest.fixture
def ingested(tmp_path):
    export = tmp_path / "export"
    sample_data.generate(export, count=5, seed=2)
    ingest([str(export)], tmp_path / "ingest")
    return tmp_path / "ingest" / "manifest.jsonl"


def test_fetch_copies_then_skips(ingested, tmp_path):
    out = tmp_path / "images"
    first = fetch_images(ingested, out)
    assert (first["ok"], first["copied"], first["skipped"], first["failed"]) == (5, 5, 0, 0)
    fetched = list(read_manifest(out / "manifest.jsonl"))
    originals = {r.key: r for r in read_manifest(ingested)}
    for r in fetched:
        target = Path(r.source.uri)
        assert target == out / "files" / f"{r.key}.jpg"
        assert target.read_bytes() == Path(originals[r.key].source.uri).read_bytes()
        assert r.boxes == originals[r.key].boxes
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "files").iterdir()}
    second = fetch_images(ingested, out)
    assert second["copied"] == 0
    assert second["skipped"] == second["ok"] == 5
    assert {p: p.stat().st_mtime_ns for p in (out / "files").iterdir()} == mtimes
    assert not [p for p in (out / "files").iterdir() if p.name.startswith(".tmp-")]


def test_a_rerun_with_nothing_to_do_keeps_its_outputs(ingested, tmp_path):
    """Fetch and verify over the same images again: the manifests they wrote stay (not even
    rewritten), the summaries count the same; other boxes on the same images are new
    outputs, although no image is fetched or decoded again."""
    def run() -> tuple[dict, dict]:
        fetched = fetch_images(ingested, tmp_path / "images")
        return fetched, verify_images(fetched["manifest"], tmp_path / "verify", workers=1)

    outputs = [tmp_path / "images" / "manifest.jsonl", tmp_path / "verify" / "manifest.jsonl",
               tmp_path / "verify" / "quarantine.jsonl"]
    first = run()
    stamps = [(p.stat().st_ino, p.stat().st_mtime_ns) for p in outputs]
    again = run()
    assert [(p.stat().st_ino, p.stat().st_mtime_ns) for p in outputs] == stamps
    assert (again[0]["ok"], again[0]["skipped"], again[1]["ok"], again[1]["skipped"]) == \
        (5, 5, 5, 5)
    assert {k: v for k, v in again[1].items() if k in ("converted", "resized", "duplicates")} \
        == {k: v for k, v in first[1].items() if k in ("converted", "resized", "duplicates")}

    records = list(read_manifest(ingested))
    write_manifest(ingested, [r.with_source(r.source, boxes=tuple(
        Box("hexagon", b.xmin, b.ymin, b.xmax, b.ymax) for b in r.boxes)) for r in records])
    relabelled = run()
    assert (relabelled[0]["skipped"], relabelled[1]["skipped"]) == (5, 5)
    for output in outputs[:2]:
        assert {b.label for r in read_manifest(output) for b in r.boxes} == {"hexagon"}


def test_fetch_reports_missing_source(ingested, tmp_path):
    victim = next(read_manifest(ingested))
    Path(victim.source.uri).unlink()
    summary = fetch_images(ingested, tmp_path / "images", max_failed_share=0.2)
    assert (summary["ok"], summary["failed"]) == (4, 1)
    [failure] = lines(tmp_path / "images" / "failures.jsonl")
    assert failure["record"] == victim.key and failure["reason"].startswith("not found: ")
    assert summary["failures_by_reason"] == {"not found": 1}


def test_fetch_over_failure_budget_fails_naming_report(ingested, tmp_path):
    victim = next(read_manifest(ingested))
    Path(victim.source.uri).unlink()  # 1 of 5 = 20% > the default 5%
    with pytest.raises(StageError, match=r"1 of 5 images failed .*failures.jsonl"):
        fetch_images(ingested, tmp_path / "images")
    [failure] = lines(tmp_path / "images" / "failures.jsonl")
    assert failure["record"] == victim.key


def test_keys_too_long_for_a_file_name_are_fetched_and_verified(tmp_path):
    """Keys flattened from deep export paths: one whose temporary name passes 255 bytes,
    two that share their first 220 characters."""
    deep = "/".join(["d" * 100] * 3)
    relative = ["x" * 120 + "/" + "y" * 119 + ".jpg", f"{deep}/one.jpg", f"{deep}/two.jpg"]
    records = []
    for seed, name in enumerate(relative):
        path = tmp_path / "export" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(jpeg_bytes(noise(seed=seed)))
        records.append(record(key_from_path(name), path))
    # keys are capped (220 characters and a hash) yet, with an extension and a temporary
    # name's affixes, still too long for one file name
    assert [len(r.key) for r in records] == [231, 231, 231]
    write_manifest(tmp_path / "m.jsonl", records)

    first = fetch_images(tmp_path / "m.jsonl", tmp_path / "images")
    assert (first["ok"], first["failed"]) == (3, 0)
    fetched = list(read_manifest(tmp_path / "images" / "manifest.jsonl"))
    stored = [Path(r.source.uri) for r in fetched]
    assert [p.read_bytes() for p in stored] == [Path(r.source.uri).read_bytes() for r in records]
    assert all(p.name.startswith(r.key[:100]) for p, r in zip(stored, records))
    assert len({p.name for p in stored}) == 3
    assert all(len(p.name.encode()) <= 255 - 32 and p.suffix == ".jpg" for p in stored)
    again = fetch_images(tmp_path / "m.jsonl", tmp_path / "images")
    assert (again["skipped"], again["copied"]) == (3, 0)  # the same names are found again
    assert [Path(r.source.uri) for r in read_manifest(tmp_path / "images" / "manifest.jsonl")] \
        == stored

    verified = verify_images(tmp_path / "images" / "manifest.jsonl", tmp_path / "verify",
                             max_side=32)
    assert (verified["ok"], verified["resized"]) == (3, 3)
    outputs = [Path(r.source.uri) for r in read_manifest(tmp_path / "verify" / "manifest.jsonl")]
    assert all(p.parent == tmp_path / "verify" / "files" and p.is_file() for p in outputs)
    assert len({p.name for p in outputs}) == 3
    assert not list((tmp_path / "verify" / "files").glob(".tmp-*"))


# --- verify ------------------------------------------------------------------------------

@pytest.fixture
def bad_images(tmp_path):
    """A manifest of one good JPEG and one file per bad case."""
    src = tmp_path / "src"
    src.mkdir()
    good = src / "good.jpg"
    good.write_bytes(jpeg_bytes(noise()))
    full = jpeg_bytes(noise(seed=1))
    truncated = src / "truncated.jpg"
    truncated.write_bytes(full[: len(full) // 2])
    text = src / "text.jpg"
    text.write_text("this is not an image\n" * 20)
    html = src / "page.jpg"
    html.write_text("<!DOCTYPE html><html><head><title>404</title></head>"
                    "<body>Not Found</body></html>")
    mismatch = src / "mismatch.jpg"
    mismatch.write_bytes(jpeg_bytes(noise((90, 48))))
    records = [record("good", good, boxes=2), record("truncated", truncated, boxes=3),
               record("text", text, boxes=1), record("html", html, boxes=2),
               record("mismatch", mismatch, boxes=4)]
    write_manifest(tmp_path / "manifest.jsonl", records)
    return tmp_path, {r.key: r for r in records}


def test_half_jpeg_passes_pil_verify_but_fails_check(bad_images):
    root, _ = bad_images
    with Image.open(root / "src" / "truncated.jpg") as im:
        im.verify()  # the shallow check PIL offers does not notice
    with pytest.raises(ValueError, match="corrupt image"):
        check_image(root / "src" / "truncated.jpg")


@pytest.mark.parametrize("key,reason", [
    ("truncated", "corrupt image"),
    ("text", "not a readable image"),
    ("html", "not a readable image"),
    ("mismatch", "size mismatch: annotation says 64x48, image is 90x48"),
])
def test_bad_image_quarantined_with_reason(bad_images, key, reason):
    root, records = bad_images
    verify_images(root / "manifest.jsonl", root / "verify", max_quarantined_share=1.0)
    entries = {e["record"]: e for e in lines(root / "verify" / "quarantine.jsonl")}
    entry = entries[key]
    assert entry["file"] == records[key].source.uri
    assert entry["reason"].startswith("quarantined: ")
    assert reason in entry["reason"]
    assert f"({len(records[key].boxes)} boxes not used)" in entry["reason"]


def test_verify_summary_counts(bad_images):
    root, records = bad_images
    summary = verify_images(root / "manifest.jsonl", root / "verify", max_quarantined_share=1.0)
    assert (summary["ok"], summary["failed"]) == (1, 4)
    assert summary["boxes_quarantined"] == 3 + 1 + 2 + 4
    assert len(lines(root / "verify" / "quarantine.jsonl")) == 4
    [kept] = list(read_manifest(root / "verify" / "manifest.jsonl"))
    assert kept.key == "good"
    assert kept.source.uri == records["good"].source.uri  # clean RGB JPEG untouched
    assert kept.boxes == records["good"].boxes
    assert json.loads((root / "verify" / "summary.json").read_text())["boxes_quarantined"] == 10


def test_default_budget_stops_a_mostly_quarantined_export(bad_images):
    """4 of 5 images do not pass: by default the stage fails (before, 1.0 let a run train on
    what was left) and says by how much, what the threshold is and how to change it."""
    root, _ = bad_images
    out = root / "verify"
    with pytest.raises(StageError) as info:
        verify_images(root / "manifest.jsonl", out)
    assert str(info.value) == (
        "verify: 4 of 5 images quarantined (80.0%), more than the budget "
        "images.max_quarantined_share = 0.05 (5.0%; --max-quarantined-share on the command "
        f"line); see {out / 'quarantine.jsonl'}")
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["ok"], summary["failed"], summary["quarantined_share"],
            summary["max_quarantined_share"]) == (1, 4, 0.8, 0.05)
    assert len(lines(out / "quarantine.jsonl")) == 4


def test_cli_verify_budget_default_and_flag(bad_images):
    """`odapi verify` takes its budget from the `images:` config section: the default
    fails the mostly broken export (exit 4, bad data), the flag lets it through."""
    root, _ = bad_images
    command = [sys.executable, "-m", "odapi_operators", "verify", "--manifest",
               str(root / "manifest.jsonl"), "--out", str(root / "verify"), "--no-progress"]
    refused = subprocess.run(command, capture_output=True, text=True)
    assert refused.returncode == 4, refused.stderr
    assert "more than the budget images.max_quarantined_share = 0.05" in refused.stderr
    assert "--max-quarantined-share" in refused.stderr
    allowed = subprocess.run([*command, "--max-quarantined-share", "0.8"], capture_output=True,
                             text=True)
    assert allowed.returncode == 0, allowed.stderr
    summary = json.loads(allowed.stdout)
    assert (summary["ok"], summary["failed"], summary["max_quarantined_share"]) == (1, 4, 0.8)


def test_cli_prepare_verifies_with_the_quarantine_budget(bad_images):
    """`odapi prepare` judges quarantines by --max-quarantined-share, downloads by
    --max-failed-share (before, the download budget was applied to both)."""
    root, _ = bad_images
    done = subprocess.run([sys.executable, "-m", "odapi_operators", "prepare", "--manifest",
                           str(root / "manifest.jsonl"), "--out", str(root / "prep"),
                           "--max-failed-share", "0", "--max-quarantined-share", "0.8",
                           "--no-progress"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (json.loads(done.stdout)["ok"], json.loads(done.stdout)["quarantined"]) == (1, 4)


def test_verify_all_bad_raises_but_writes_quarantine(bad_images):
    root, records = bad_images
    write_manifest(root / "bad.jsonl", [r for k, r in records.items() if k != "good"])
    with pytest.raises(StageError, match="quarantine.jsonl"):
        verify_images(root / "bad.jsonl", root / "verify")
    assert len(lines(root / "verify" / "quarantine.jsonl")) == 4


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "LA"])
def test_non_rgb_png_converted_to_rgb_jpeg(tmp_path, mode):
    rgb = Image.new("RGB", (40, 30), (200, 40, 40))
    rgb.paste((20, 20, 220), (0, 0, 20, 30))
    if mode == "P":
        source = rgb.quantize(colors=4)
    else:
        source = rgb.convert(mode)
    assert source.mode == mode
    src = tmp_path / f"img_{mode}.png"
    source.save(src, "PNG")
    write_manifest(tmp_path / "m.jsonl", [record("k", src, size=(40, 30))])
    summary = verify_images(tmp_path / "m.jsonl", tmp_path / "verify")
    assert summary["ok"] == 1
    [out] = list(read_manifest(tmp_path / "verify" / "manifest.jsonl"))
    assert Path(out.source.uri) == tmp_path / "verify" / "files" / "k.jpg"
    assert (out.width, out.height) == (40, 30)
    with Image.open(out.source.uri) as im:
        assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (40, 30))
        left, right = im.getpixel((10, 15)), im.getpixel((30, 15))
    expected = source.convert("RGB")
    for got, want in ((left, expected.getpixel((10, 15))), (right, expected.getpixel((30, 15)))):
        assert all(abs(g - w) <= 8 for g, w in zip(got, want))
    assert src.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # source left alone


def test_rgb_png_passes_through(tmp_path):
    src = tmp_path / "rgb.png"
    noise((32, 32)).save(src, "PNG")
    write_manifest(tmp_path / "m.jsonl", [record("k", src, size=(32, 32))])
    verify_images(tmp_path / "m.jsonl", tmp_path / "verify")
    [out] = list(read_manifest(tmp_path / "verify" / "manifest.jsonl"))
    assert out.source.uri == str(src)


@pytest.mark.parametrize("fmt,allowed,reason", [
    ("TIFF", None, "not a readable image"),  # no web-image magic bytes: never handed to Pillow
    ("BMP", frozenset({"JPEG", "PNG"}), "format BMP not allowed (allowed: JPEG, PNG)"),
])
def test_disallowed_format_quarantined(tmp_path, fmt, allowed, reason):
    from odapi_operators.core.data.normalize import NormalizeOptions

    src = tmp_path / "img.jpg"
    noise((32, 32)).save(src, fmt)
    write_manifest(tmp_path / "m.jsonl", [record("bad", src, size=(32, 32)),
                                          record("ok", tmp_path / "ok.jpg", size=(32, 32))])
    (tmp_path / "ok.jpg").write_bytes(jpeg_bytes(noise((32, 32))))
    options = NormalizeOptions(allowed_formats=allowed) if allowed else None
    verify_images(tmp_path / "m.jsonl", tmp_path / "verify", options=options,
                  max_quarantined_share=0.5)  # 1 of 2
    [entry] = lines(tmp_path / "verify" / "quarantine.jsonl")
    assert entry["record"] == "bad" and reason in entry["reason"]


def test_bmp_allowed_by_default_and_reencoded(tmp_path):
    src = tmp_path / "img.bmp"
    noise((32, 32)).save(src, "BMP")
    write_manifest(tmp_path / "m.jsonl", [record("bmp", src, size=(32, 32))])
    assert verify_images(tmp_path / "m.jsonl", tmp_path / "verify")["converted"] == 1
    [out] = list(read_manifest(tmp_path / "verify" / "manifest.jsonl"))
    with Image.open(out.source.uri) as im:
        assert (im.format, im.size) == ("JPEG", (32, 32))


@pytest.mark.parametrize("side", [100, 40], ids=["bomb-error", "bomb-warning"])
def test_decompression_bomb_quarantined(tmp_path, monkeypatch, side):
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 1000)
    bomb = tmp_path / "bomb.png"
    Image.new("RGB", (side, side), (1, 2, 3)).save(bomb, "PNG")
    ok = tmp_path / "ok.jpg"
    ok.write_bytes(jpeg_bytes(noise((20, 20))))  # 400 pixels: under the limit
    write_manifest(tmp_path / "m.jsonl", [record("bomb", bomb, size=(side, side), boxes=2),
                                          record("ok", ok, size=(20, 20))])
    summary = verify_images(tmp_path / "m.jsonl", tmp_path / "verify",
                            max_quarantined_share=0.5)  # 1 of 2
    assert (summary["ok"], summary["failed"], summary["boxes_quarantined"]) == (1, 1, 2)
    [entry] = lines(tmp_path / "verify" / "quarantine.jsonl")
    assert entry["record"] == "bomb" and "not a readable image" in entry["reason"]
    assert "decompression bomb" in entry["reason"].lower()
