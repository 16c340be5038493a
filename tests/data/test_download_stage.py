"""The fetch/download stage end to end against a real local server: resume, budget, progress,
duplicates, a killed run, a full disk, `odapi download --index`, and gs:// sources."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from PIL import Image

from odapi_operators.core.data.download import DownloadPolicy
from odapi_operators.core.data.fetch import fetch_images
from odapi_operators.core.data.manifest import (
    Box,
    ImageRecord,
    ImageSource,
    read_manifest,
    write_manifest,
)
from odapi_operators.core.rejections import StageError

from support.hostile_inputs import png_bomb, tiny_filesystem
from support.image_server import ImageServer, huge, redirect, reset_after, send, stall, status

ROOT = Path(__file__).resolve().parents[2]
FAST = DownloadPolicy(connect_timeout=2, read_timeout=2, deadline=5, retries=1, backoff=0.01)


def jpeg(seed: int, size=(48, 32)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (seed * 37 % 256, seed * 91 % 256, 120)).save(buf, "JPEG")
    return buf.getvalue()


def url_record(key: str, url: str, md5: str | None = None) -> ImageRecord:
    return ImageRecord(key=key, source=ImageSource("url", url), source_id=key, width=None,
                       height=None, boxes=(Box("thing", 0.1, 0.1, 0.5, 0.5),),
                       provenance={"file": "index.csv"}, md5=md5)


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def server():
    with ImageServer() as running:
        yield running


def serve_images(server: ImageServer, tmp_path: Path, count: int, **behaviour) -> Path:
    """`count` distinct JPEGs at /img/<i>.jpg and a manifest of them."""
    records = []
    for i in range(count):
        path = f"/img/{i}.jpg"
        server.routes[path] = send(jpeg(i))
        if behaviour.get("delay"):
            server.routes[path] = stall(behaviour["delay"], server.routes[path])
        records.append(url_record(f"k{i:03d}", server.url(path)))
    manifest = tmp_path / "manifest.jsonl"
    write_manifest(manifest, records)
    return manifest


def test_download_then_resume_makes_no_request(server, tmp_path):
    manifest = serve_images(server, tmp_path, 20)
    out = tmp_path / "images"
    first = fetch_images(manifest, out, threads=8, policy=FAST)
    assert (first["ok"], first["failed"], first["downloaded"], first["skipped"]) == (20, 0, 20, 0)
    assert sum(server.counts.values()) == 20
    fetched = list(read_manifest(out / "manifest.jsonl"))
    assert [r.key for r in fetched] == [f"k{i:03d}" for i in range(20)]  # input order kept
    for i, record in enumerate(fetched):
        assert Path(record.source.uri) == out / "files" / f"k{i:03d}.jpg"
        assert Path(record.source.uri).read_bytes() == jpeg(i)
        assert record.provenance["sha256"] == hashlib.sha256(jpeg(i)).hexdigest()
        assert record.provenance["fetched_from"] == server.url(f"/img/{i}.jpg")
        assert record.boxes == (Box("thing", 0.1, 0.1, 0.5, 0.5),)
    second = fetch_images(manifest, out, threads=8, policy=FAST)
    assert sum(server.counts.values()) == 20  # not one more request
    assert (second["ok"], second["skipped"], second["downloaded"]) == (20, 20, 0)
    assert (out / "manifest.jsonl").read_text() == "".join(r.to_json() + "\n" for r in fetched)


def test_changed_md5_is_fetched_again(server, tmp_path):
    manifest = serve_images(server, tmp_path, 2)
    fetch_images(manifest, tmp_path / "images", policy=FAST)
    records = list(read_manifest(manifest))
    records[0] = url_record("k000", records[0].source.uri, hashlib.md5(jpeg(0)).hexdigest())
    write_manifest(manifest, records)
    summary = fetch_images(manifest, tmp_path / "images", policy=FAST)
    assert (summary["downloaded"], summary["skipped"]) == (1, 1)
    assert server.counts["/img/0.jpg"] == 2 and server.counts["/img/1.jpg"] == 1


@pytest.mark.parametrize("dead,budget,fails", [(1, 0.05, False), (2, 0.05, True),
                                               (2, 0.1, False)])
def test_failure_budget(server, tmp_path, dead, budget, fails):
    manifest = serve_images(server, tmp_path, 20)
    for i in range(dead):
        server.routes[f"/img/{i}.jpg"] = status(404)
    out = tmp_path / "images"
    if fails:
        with pytest.raises(StageError, match=rf"^fetch: {dead} of 20 images failed \(10.0%\), "
                                             r"more than the budget images.max_failed_share = "
                                             r"0.05 \(5.0%; --max-failed-share on the command "
                                             rf"line\); see {out}/failures.jsonl$"):
            fetch_images(manifest, out, policy=FAST, max_failed_share=budget)
    else:
        summary = fetch_images(manifest, out, policy=FAST, max_failed_share=budget)
        assert (summary["ok"], summary["failed"]) == (20 - dead, dead)
        assert summary["failures_by_reason"] == {"http 404": dead}
        assert (summary["failed_share"], summary["max_failed_share"]) == (dead / 20, budget)
    failures = sorted(lines(out / "failures.jsonl"), key=lambda f: f["record"])
    assert [(f["record"], f["file"]) for f in failures] == \
        [(f"k{i:03d}", server.url(f"/img/{i}.jpg")) for i in range(dead)]
    assert all(f["reason"] == "http 404: HTTP 404 Not Found" for f in failures)


def test_failures_counted_by_their_real_reason(server, tmp_path):
    """Every way a host can fail an image has its own short key in `failures_by_reason`, and
    each failure's reason starts with it (before, all of them were one "fetch failed")."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}/x.jpg"  # nothing listens there
    server.routes.update({
        "/ok.jpg": send(jpeg(1)), "/gone.jpg": status(404), "/forbidden.jpg": status(403),
        "/down.jpg": status(503), "/slow.jpg": stall(5, send(jpeg(2))),
        "/reset.jpg": reset_after(jpeg(3), 100), "/big.jpg": huge(10 << 30, jpeg(4)[:16]),
        "/page.jpg": send(b"<html>sign in</html>", content_type="image/jpeg"),
        "/a": redirect("/b"), "/b": redirect("/a"),
    })
    for i in range(6):
        server.routes[f"/r{i}"] = redirect(f"/r{i + 1}")
    paths = ["/ok.jpg", "/gone.jpg", "/forbidden.jpg", "/down.jpg", "/slow.jpg", "/reset.jpg",
             "/big.jpg", "/page.jpg", "/a", "/r0"]
    records = [url_record(f"k{i}", server.url(p)) for i, p in enumerate(paths)]
    write_manifest(tmp_path / "m.jsonl", [*records, url_record("refused", closed)])
    policy = DownloadPolicy(connect_timeout=2, read_timeout=0.3, deadline=5, retries=0)
    summary = fetch_images(tmp_path / "m.jsonl", tmp_path / "images", policy=policy,
                           max_failed_share=1.0)
    expected = {"http 404": 1, "http 403": 1, "http 503": 1, "timeout": 1,
                "connection reset": 1, "too large": 1, "not an image": 1, "redirect loop": 1,
                "too many redirects": 1, "connection refused": 1}
    assert summary["failures_by_reason"] == expected
    assert (summary["ok"], summary["failed"]) == (1, 10)
    reasons = [f["reason"] for f in lines(tmp_path / "images" / "failures.jsonl")]
    assert sorted(r.split(": ", 1)[0] for r in reasons) == sorted(expected)


def test_identical_bytes_stored_once(server, tmp_path):
    server.routes["/a.jpg"] = send(jpeg(1))
    server.routes["/b.jpg"] = send(jpeg(1))
    write_manifest(tmp_path / "m.jsonl", [url_record("a", server.url("/a.jpg")),
                                          url_record("b", server.url("/b.jpg"))])
    summary = fetch_images(tmp_path / "m.jsonl", tmp_path / "images", threads=1, policy=FAST)
    assert (summary["ok"], summary["duplicates"]) == (2, 1)
    a, b = (tmp_path / "images" / "files" / n for n in ("a.jpg", "b.jpg"))
    assert a.stat().st_ino == b.stat().st_ino  # one copy on disk, viewable under both keys


def test_progress_lines_at_a_cadence(server, tmp_path):
    manifest = serve_images(server, tmp_path, 12, delay=0.05)
    logged: list[str] = []
    fetch_images(manifest, tmp_path / "images", threads=2, policy=FAST, log=logged.append,
                 progress_every=0.1)
    assert len(logged) >= 3
    assert logged[-1].startswith("fetch: 12/12 done (0 resumed), 0 failed, ")
    assert all(" images/s, ETA " in line for line in logged)


def test_killed_download_resumes_where_it_stopped(server, tmp_path):
    manifest = serve_images(server, tmp_path, 60, delay=0.05)
    out = tmp_path / "images"
    child = subprocess.Popen([sys.executable, "-m", "odapi_operators", "download",
                              "--manifest", str(manifest), "--out", str(out), "--threads", "2",
                              "--no-progress"], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    index = out / "fetch-index.jsonl"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (not index.exists() or
                                           len(index.read_text().splitlines()) < 10):
        time.sleep(0.02)
    child.send_signal(signal.SIGKILL)
    child.wait()
    done_before = len(index.read_text().splitlines())
    assert 10 <= done_before < 60, "the child finished before it could be killed"
    requested_before = sum(server.counts.values())
    summary = fetch_images(manifest, out, threads=8, policy=FAST)
    assert summary["ok"] == 60 and summary["skipped"] >= done_before
    assert sum(server.counts.values()) - requested_before <= 60 - done_before
    for record in read_manifest(out / "manifest.jsonl"):
        Image.open(record.source.uri).load()  # every stored file is whole


def test_full_disk_stops_the_stage_with_a_clear_error(server, tmp_path):
    big = os.urandom(30_000)  # random: JPEG-framed noise that cannot be compressed away
    for i in range(10):
        server.routes[f"/big/{i}.jpg"] = send(b"\xff\xd8\xff\xe0" + big + bytes([i]))
    write_manifest(tmp_path / "m.jsonl", [url_record(f"k{i}", server.url(f"/big/{i}.jpg"))
                                          for i in range(10)])
    with tiny_filesystem(tmp_path / "disk") as disk:
        with pytest.raises(StageError, match=r"fetch: disk error, stopping: cannot write "
                                             r".*: No space left on device"):
            fetch_images(tmp_path / "m.jsonl", disk / "images", threads=2, policy=FAST)
        leftovers = [p.name for p in (disk / "images" / "files").iterdir()]
        assert not [n for n in leftovers if n.startswith(".tmp-")]


def test_cli_download_open_images_index(server, tmp_path):
    images = {f"id{i:02d}": jpeg(i) for i in range(4)}
    for image_id, data in images.items():
        server.routes[f"/oi/{image_id}.jpg"] = send(data)
    server.routes["/oi/html"] = send(b"<html>gone</html>", content_type="image/jpeg")
    b64 = {k: base64.b64encode(hashlib.md5(v).digest()).decode() for k, v in images.items()}
    rows = ["ImageID,Subset,OriginalURL,OriginalLandingURL,License,OriginalMD5,Rotation"]
    rows += [f"{k},train,{server.url(f'/oi/{k}.jpg')},x,y,{b64[k]},0" for k in images]
    rows.append(f"bad_md5,train,{server.url('/oi/id00.jpg')},x,y,{b64['id01']},90")
    rows.append(f"html,train,{server.url('/oi/html')},x,y,,")
    rows.append("noturl,train,ftp://host/x.jpg,x,y,,")
    index = tmp_path / "index.csv"
    index.write_text("\n".join(rows) + "\n")
    out = tmp_path / "dl"
    run = subprocess.run([sys.executable, "-m", "odapi_operators", "download", "--index",
                          str(index), "--out", str(out), "--max-failed-share", "0.5",
                          "--no-progress"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout)
    assert (summary["ok"], summary["failed"], summary["index_rejected"]) == (4, 2, 1)
    for image_id, data in images.items():
        assert (out / f"{image_id}.jpg").read_bytes() == data
    reasons = {f["record"]: f["reason"] for f in lines(out / "failures.jsonl")}
    assert reasons["bad_md5"].startswith("md5 mismatch: expected ")
    assert reasons["html"].startswith("not an image: content starts with ")
    assert summary["failures_by_reason"] == {"md5 mismatch": 1, "not an image": 1}
    [rejected] = lines(out / "index-rejections.jsonl")
    assert rejected["record"] == "line 8" and "invalid URL" in rejected["reason"]
    second = subprocess.run([sys.executable, "-m", "odapi_operators", "download", "--index",
                             str(index), "--out", str(out), "--max-failed-share", "0.5",
                             "--no-progress"], capture_output=True, text=True)
    assert json.loads(second.stdout)["skipped"] == 4


def test_gs_sources_via_the_storage_layer(tmp_path):
    from odapi_operators.core import storage

    try:
        storage.backend("gs://x/y")
        from gcp_storage_emulator.server import create_server
    except Exception as exc:  # noqa: BLE001 (any reason the gs backend is unavailable)
        pytest.skip(f"no gs:// backend or emulator here: {exc}")
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    bucket = "odapi-fetch-test"
    emulator = create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket)
    emulator.start()
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{port}")
            prefix = f"gs://{bucket}/{uuid.uuid4().hex[:8]}"
            storage.write_bytes(f"{prefix}/a.jpg", jpeg(3))
            storage.write_bytes(f"{prefix}/b.jpg", b"<html>not an image</html>")
            records = [ImageRecord(k, ImageSource("gs", f"{prefix}/{k}.jpg"), k, None, None, ())
                       for k in ("a", "b")]
            write_manifest(tmp_path / "m.jsonl", records)
            summary = fetch_images(tmp_path / "m.jsonl", tmp_path / "images",
                                   max_failed_share=0.5)
    finally:
        emulator.stop()
    assert (summary["ok"], summary["failed"]) == (1, 1)
    assert (tmp_path / "images" / "files" / "a.jpg").read_bytes() == jpeg(3)
    [failure] = lines(tmp_path / "images" / "failures.jsonl")
    assert failure["record"] == "b" and "not an image" in failure["reason"]


def test_hostile_images_pass_magic_check_then_verify_quarantines(server, tmp_path):
    from odapi_operators.core.data.verify import verify_images

    whole = jpeg(5, size=(400, 300))
    server.routes["/bomb.png"] = send(png_bomb(), content_type="image/png")
    server.routes["/half.jpg"] = send(whole[: len(whole) // 2])
    server.routes["/ok.jpg"] = send(whole)
    write_manifest(tmp_path / "m.jsonl", [url_record(k, server.url(f"/{k}"))
                                          for k in ("bomb.png", "half.jpg", "ok.jpg")])
    fetched = fetch_images(tmp_path / "m.jsonl", tmp_path / "images", policy=FAST)
    assert fetched["ok"] == 3  # bytes look like images: download cannot know better
    verified = verify_images(fetched["manifest"], tmp_path / "verify",
                             max_quarantined_share=1.0)  # 2 of 3: the reasons are the point
    assert (verified["ok"], verified["failed"], verified["boxes_quarantined"]) == (1, 2, 2)
    reasons = {e["record"]: e["reason"] for e in lines(tmp_path / "verify" / "quarantine.jsonl")}
    assert "decompression bomb" in reasons["bomb.png"]
    assert "corrupt image" in reasons["half.jpg"]


def test_cli_prepare_overlaps_stages_and_reruns_without_requests(server, tmp_path):
    manifest = serve_images(server, tmp_path, 24)
    out = tmp_path / "prep"
    cmd = [sys.executable, "-m", "odapi_operators", "prepare", "--manifest", str(manifest),
           "--out", str(out), "--max-side", "32", "--split", "train=0.5,val=0.5",
           "--no-progress"]
    first = subprocess.run(cmd, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    summary = json.loads(first.stdout)
    assert (summary["ok"], summary["failed"], summary["records_cached"]) == (24, 0, False)
    assert sum(summary["splits"].values()) == 24
    verified = list(read_manifest(out / "verify" / "manifest.jsonl"))
    assert all(max(r.width, r.height) == 32 for r in verified)
    assert sum(server.counts.values()) == 24
    second = json.loads(subprocess.run(cmd, capture_output=True, text=True).stdout)
    assert (second["skipped"], second["records_cached"]) == (24, True)
    assert sum(server.counts.values()) == 24  # the re-run asked the server for nothing
