"""normalize + verify stage: orientation of pixels AND boxes, draft resize, hostile images,
duplicates, resume, and the worker-process path."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image, ImageOps

from odapi_operators.core.data.manifest import (
    Box,
    ImageRecord,
    ImageSource,
    read_manifest,
    write_manifest,
)
from odapi_operators.core.data.normalize import NormalizeOptions, normalize
from odapi_operators.core.data.orientation import transform_box
from odapi_operators.core.data.verify import verify_images

from support.hostile_inputs import png_bomb

W, H = 120, 80
RED_BOX = Box("red", 10 / W, 15 / H, 40 / W, 35 / H)       # off-centre, so a wrong
BLUE_BOX = Box("blue", 70 / W, 50 / H, 110 / W, 72 / H)   # flip or turn lands elsewhere
COLOURS = {"red": (230, 20, 20), "blue": (20, 20, 230)}


def scene(size=(W, H)) -> Image.Image:
    image = Image.new("RGB", size, (128, 128, 128))
    for box in (RED_BOX, BLUE_BOX):
        px = (round(box.xmin * size[0]), round(box.ymin * size[1]),
              round(box.xmax * size[0]), round(box.ymax * size[1]))
        image.paste(COLOURS[box.label], px)
    return image


def encode(image: Image.Image, fmt="JPEG", orientation: int | None = None, **kw) -> bytes:
    buf = io.BytesIO()
    if orientation:
        exif = Image.Exif()
        exif[0x0112] = orientation
        kw["exif"] = exif.tobytes()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def colour_at_centre(image: Image.Image, box: Box) -> tuple[int, int, int]:
    x = (box.xmin + box.xmax) / 2 * image.width
    y = (box.ymin + box.ymax) / 2 * image.height
    return image.convert("RGB").getpixel((int(x), int(y)))


def close(a, b, tol=40) -> bool:
    return all(abs(x - y) <= tol for x, y in zip(a, b))


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("rotation", [0, 90, 180, 270])
def test_boxes_still_land_on_the_object(orientation, rotation):
    data = encode(scene(), orientation=orientation, quality=95)
    result = normalize(data, rotation)
    if orientation == 1 and rotation == 0:
        assert result.data is None  # nothing to do: original bytes pass through
        return
    out = Image.open(io.BytesIO(result.data))
    assert "exif" not in out.info or Image.Exif().get(0x0112) is None
    turns = (orientation in (5, 6, 7, 8)) ^ (rotation in (90, 270))
    assert out.size == ((H, W) if turns else (W, H)) == (result.width, result.height)
    for box in (RED_BOX, BLUE_BOX):
        moved = transform_box(box, result.ops)
        assert close(colour_at_centre(out, moved), COLOURS[box.label]), (box.label, result.ops)


@pytest.mark.parametrize("orientation", range(2, 9))
def test_exif_applied_as_pillow_does(orientation):
    data = encode(scene(), "PNG", orientation=orientation)
    expected = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    out = Image.open(io.BytesIO(normalize(data).data))
    assert out.size == expected.size
    diff = np.abs(np.asarray(out, int) - np.asarray(expected, int))
    assert diff.mean() < 3  # same pixels, up to JPEG noise


def test_verify_stage_moves_boxes_with_pixels(tmp_path):
    src = tmp_path / "turned.jpg"
    src.write_bytes(encode(scene(), orientation=6, quality=95))
    record = ImageRecord("k", ImageSource("local", str(src)), "k", W, H, (RED_BOX, BLUE_BOX),
                         rotation=90)
    write_manifest(tmp_path / "m.jsonl", [record])
    summary = verify_images(tmp_path / "m.jsonl", tmp_path / "verify")
    assert summary["rotated"] == 1
    [out] = read_manifest(tmp_path / "verify" / "manifest.jsonl")
    assert out.rotation == 0  # applied: no later stage may turn it again
    image = Image.open(out.source.uri)
    assert (out.width, out.height) == image.size == (W, H)  # 90 (EXIF) + 90 = 180 degrees
    for box in out.boxes:
        assert close(colour_at_centre(image, box), COLOURS[box.label])


def test_draft_resize_to_max_side_keeps_boxes(tmp_path):
    big = scene((2400, 1600))
    result = normalize(encode(big, quality=90), options=NormalizeOptions(max_side=600))
    out = Image.open(io.BytesIO(result.data))
    assert out.size == (600, 400) and result.resized and result.ops == ()
    for box in (RED_BOX, BLUE_BOX):
        assert close(colour_at_centre(out, box), COLOURS[box.label])


def test_draft_mode_is_used_for_large_jpegs(monkeypatch):
    from PIL.JpegImagePlugin import JpegImageFile

    calls = []
    original = JpegImageFile.draft

    def spy(self, mode, size):
        scaled = original(self, mode, size)
        calls.append((size, self.size))
        return scaled

    monkeypatch.setattr(JpegImageFile, "draft", spy)
    normalize(encode(scene((2000, 1000))), options=NormalizeOptions(max_side=400))
    assert calls == [((400, 200), (500, 250))]  # libjpeg decodes at 1/4 scale


def test_small_image_passes_through_with_max_side():
    data = encode(scene(), quality=90)
    result = normalize(data, options=NormalizeOptions(max_side=600))
    assert result.data is None and (result.width, result.height) == (W, H)


def test_truncated_jpeg_caught_even_with_draft():
    data = encode(scene((1600, 1200)), quality=90)
    with pytest.raises(ValueError, match="corrupt image"):
        normalize(data[: len(data) // 2], options=NormalizeOptions(max_side=200))


def test_png_decompression_bomb_refused_before_decoding():
    bomb = png_bomb()
    assert len(bomb) < 100_000
    with pytest.raises(ValueError, match="not a readable image: .*decompression bomb"):
        normalize(bomb)


def test_cmyk_jpeg_becomes_rgb():
    cmyk = scene().convert("CMYK")
    result = normalize(encode(cmyk, quality=95))
    out = Image.open(io.BytesIO(result.data))
    assert out.mode == "RGB"
    assert close(colour_at_centre(out, RED_BOX), COLOURS["red"], tol=60)


def test_16_bit_png_scaled_not_clipped():
    gray = Image.fromarray(np.full((20, 30), 32768, dtype=np.uint16))
    assert gray.mode.startswith("I;16")
    out = Image.open(io.BytesIO(normalize(encode(gray, "PNG")).data))
    assert close(out.getpixel((5, 5)), (128, 128, 128), tol=3)


def test_transparent_png_composited_on_white():
    rgba = Image.new("RGBA", (10, 10), (255, 0, 0, 0))
    out = Image.open(io.BytesIO(normalize(encode(rgba, "PNG")).data))
    assert close(out.getpixel((5, 5)), (255, 255, 255), tol=3)


@pytest.fixture
def dataset(tmp_path):
    """20 records (enough for the worker pool): converted PNGs, one duplicate pair, a bomb."""
    src = tmp_path / "src"
    src.mkdir()
    records = []
    for i in range(18):
        path = src / f"{i}.png"
        Image.new("RGBA", (40, 30), (i * 10, 50, 90, 255)).save(path)
        records.append(ImageRecord(f"k{i:02d}", ImageSource("local", str(path)), str(i), 40, 30,
                                   (Box("thing", 0.1, 0.1, 0.5, 0.5),)))
    twin = src / "twin.png"
    twin.write_bytes((src / "3.png").read_bytes())
    records.append(ImageRecord("k98", ImageSource("local", str(twin)), "twin", 40, 30, ()))
    (src / "bomb.png").write_bytes(png_bomb())
    records.append(ImageRecord("k99", ImageSource("local", str(src / "bomb.png")), "bomb", None,
                               None, (Box("thing", 0, 0, 1, 1), Box("other", 0, 0, .5, .5))))
    write_manifest(tmp_path / "m.jsonl", records)
    return tmp_path


def test_worker_pool_matches_inline(dataset):
    pooled = verify_images(dataset / "m.jsonl", dataset / "pooled", workers=2)
    inline = verify_images(dataset / "m.jsonl", dataset / "inline", workers=1)
    for key in ("ok", "failed", "converted", "duplicates", "boxes_quarantined"):
        assert pooled[key] == inline[key]
    assert (pooled["ok"], pooled["failed"], pooled["duplicates"]) == (19, 1, 1)
    a = [(r.key, r.width, r.boxes) for r in read_manifest(dataset / "pooled" / "manifest.jsonl")]
    b = [(r.key, r.width, r.boxes) for r in read_manifest(dataset / "inline" / "manifest.jsonl")]
    assert a == b and [k for k, *_ in a] == sorted(k for k, *_ in a)


def test_duplicates_stored_once(dataset):
    verify_images(dataset / "m.jsonl", dataset / "verify")
    by_key = {r.key: r for r in read_manifest(dataset / "verify" / "manifest.jsonl")}
    assert by_key["k98"].source.uri == by_key["k03"].source.uri
    assert not (dataset / "verify" / "files" / "k98.jpg").exists()


def test_quarantine_lists_reason_and_boxes(dataset):
    summary = verify_images(dataset / "m.jsonl", dataset / "verify")
    assert summary["boxes_quarantined"] == 2
    [entry] = [json.loads(x) for x in (dataset / "verify" / "quarantine.jsonl").open()]
    assert entry["record"] == "k99" and "decompression bomb" in entry["reason"]
    assert [b["label"] for b in entry["boxes"]] == ["thing", "other"]


def test_verify_budget_fails_with_report(dataset):
    from odapi_operators.core.rejections import StageError

    with pytest.raises(StageError, match=r"^verify: 1 of 20 images quarantined \(5.0%\), more "
                                         r"than the budget images.max_quarantined_share = 0.01 "
                                         r"\(1.0%; --max-quarantined-share on the command "
                                         r"line\); see .*/quarantine.jsonl$"):
        verify_images(dataset / "m.jsonl", dataset / "verify", max_quarantined_share=0.01)


def test_rerun_decodes_nothing_and_option_change_redoes(dataset):
    first = verify_images(dataset / "m.jsonl", dataset / "verify")
    stamp = (dataset / "verify" / "files" / "k00.jpg").stat().st_mtime_ns
    second = verify_images(dataset / "m.jsonl", dataset / "verify")
    assert second["skipped"] == 20 and second["ok"] == first["ok"]
    assert (dataset / "verify" / "files" / "k00.jpg").stat().st_mtime_ns == stamp
    assert (dataset / "verify" / "manifest.jsonl").read_text() == \
        (dataset / "verify" / "manifest.jsonl").read_text()
    third = verify_images(dataset / "m.jsonl", dataset / "verify", max_side=20)
    assert third["skipped"] == 0 and third["resized"] == 19
