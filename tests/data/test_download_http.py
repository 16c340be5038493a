"""HttpDownloader against a real server on 127.0.0.1 playing every hostile or flaky host."""

from __future__ import annotations

import hashlib
import io
import socket
import time

import pytest
from PIL import Image

from odapi_operators.core.data.download import (
    DownloadPolicy,
    FetchError,
    HttpDownloader,
    parse_retry_after,
)

from support.image_server import (
    ImageServer,
    drip,
    endless,
    huge,
    redirect,
    reset_after,
    send,
    sequence,
    stall,
    status,
)

FAST = DownloadPolicy(connect_timeout=2, read_timeout=1, deadline=3, retries=2, backoff=0.01,
                      backoff_max=0.05, retry_after_max=0.3, max_redirects=3, max_bytes=1 << 20)


def jpeg(size=(64, 48), colour=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "JPEG")
    return buf.getvalue()


JPEG = jpeg()


@pytest.fixture
def server():
    with ImageServer() as running:
        yield running


def get(server, path, policy=FAST, md5=None):
    return HttpDownloader(policy, connections=4).get(server.url(path), md5)


def test_image_downloaded_in_one_request(server):
    server.routes["/a.jpg"] = send(JPEG)
    fetched = get(server, "/a.jpg")
    assert (fetched.data, fetched.format, fetched.attempts) == (JPEG, "JPEG", 1)
    assert server.counts["/a.jpg"] == 1


def test_404_is_final_not_retried(server):
    with pytest.raises(FetchError, match="^http 404: HTTP 404 Not Found$") as info:
        get(server, "/missing.jpg")
    assert info.value.kind == "http 404"
    assert server.counts["/missing.jpg"] == 1


def test_500_burst_then_success(server):
    server.routes["/flaky.jpg"] = sequence(status(500), status(503), send(JPEG))
    fetched = get(server, "/flaky.jpg")
    assert fetched.data == JPEG and fetched.attempts == 3
    assert server.counts["/flaky.jpg"] == 3


def test_500_forever_fails_after_bounded_retries(server):
    server.routes["/down.jpg"] = status(500)
    with pytest.raises(FetchError,
                       match=r"^http 500: HTTP 500 Internal Server Error \(after 3 attempts\)$"):
        get(server, "/down.jpg")
    assert server.counts["/down.jpg"] == 1 + FAST.retries


def test_429_retry_after_is_honoured(server):
    server.routes["/busy.jpg"] = sequence(status(429, {"Retry-After": "1"}), send(JPEG))
    policy = DownloadPolicy(**{**FAST.__dict__, "retry_after_max": 5})
    start = time.monotonic()
    assert get(server, "/busy.jpg", policy).data == JPEG
    assert time.monotonic() - start >= 0.95  # waited as told, not the 10 ms backoff
    assert server.counts["/busy.jpg"] == 2


def test_429_retry_after_is_capped(server):
    server.routes["/busy.jpg"] = sequence(status(429, {"Retry-After": "3600"}), send(JPEG))
    start = time.monotonic()
    assert get(server, "/busy.jpg").data == JPEG
    assert time.monotonic() - start < 2  # cut to retry_after_max (0.3 s), not an hour


def test_retry_after_http_date():
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == 10.0
    assert parse_retry_after("12") == 12.0
    assert parse_retry_after("soon") is None


def test_redirect_followed(server):
    server.routes["/old.jpg"] = redirect("/new.jpg", 301)
    server.routes["/new.jpg"] = send(JPEG)
    fetched = get(server, "/old.jpg")
    assert fetched.data == JPEG and fetched.url.endswith("/new.jpg")


def test_redirect_loop_stops_when_a_url_comes_back(server):
    server.routes["/a"] = redirect("/b")
    server.routes["/b"] = redirect("/a")
    with pytest.raises(FetchError, match=r"^redirect loop: \S+/a -> \S+/b -> \S+/a$"):
        get(server, "/a")
    assert (server.counts["/a"], server.counts["/b"]) == (1, 1)  # not retried


def test_redirect_chain_stops_at_limit(server):
    for i in range(6):
        server.routes[f"/r{i}"] = redirect(f"/r{i + 1}")
    with pytest.raises(FetchError, match="^too many redirects: more than 3"):
        get(server, "/r0")
    assert sum(server.counts.values()) == FAST.max_redirects + 1  # not retried


def test_redirect_to_other_scheme_refused(server):
    server.routes["/evil"] = redirect("file:///etc/passwd")
    with pytest.raises(FetchError, match="^unsupported scheme: not an http"):
        get(server, "/evil")


def test_10_gb_content_length_refused_without_reading(server):
    server.routes["/huge.jpg"] = huge(10 * 1024 ** 3, JPEG[:1024], hold=10)
    start = time.monotonic()
    with pytest.raises(FetchError, match=r"too large: Content-Length 10737418240 > limit"):
        get(server, "/huge.jpg")
    assert time.monotonic() - start < 1.5
    assert server.counts["/huge.jpg"] == 1  # a size refusal is final


def test_body_without_length_cut_at_limit(server):
    server.routes["/stream.jpg"] = endless(JPEG[:64])
    with pytest.raises(FetchError, match="too large: body exceeds limit 1048576 bytes"):
        get(server, "/stream.jpg")


def test_slow_loris_hits_the_deadline(server):
    server.routes["/drip.jpg"] = drip(JPEG, every=0.05)  # each byte well within read timeout
    policy = DownloadPolicy(**{**FAST.__dict__, "deadline": 0.6, "retries": 1})
    start = time.monotonic()
    with pytest.raises(FetchError, match=r"deadline exceeded: body incomplete after 0.6 s"):
        get(server, "/drip.jpg", policy)
    assert time.monotonic() - start < 2 * (0.6 + policy.read_timeout)
    assert server.counts["/drip.jpg"] == 2


def test_read_timeout_before_headers_is_retried(server):
    server.routes["/stall.jpg"] = sequence(stall(3, send(JPEG)), send(JPEG))
    fetched = get(server, "/stall.jpg")
    assert fetched.data == JPEG and fetched.attempts == 2


def test_connection_reset_mid_body_is_retried(server):
    server.routes["/reset.jpg"] = sequence(reset_after(JPEG, len(JPEG) // 2), send(JPEG))
    fetched = get(server, "/reset.jpg")
    assert fetched.data == JPEG and server.counts["/reset.jpg"] == 2


def test_connection_reset_forever_fails_with_reason(server):
    server.routes["/reset.jpg"] = reset_after(JPEG, len(JPEG) // 2)
    with pytest.raises(FetchError, match="^connection reset: ") as info:
        get(server, "/reset.jpg")
    assert "after 3 attempts" in info.value.reason


def test_connection_refused_fails_with_reason():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens once closed
    with pytest.raises(FetchError, match="^connection refused: "):
        HttpDownloader(FAST).get(f"http://127.0.0.1:{port}/x.jpg")


def test_html_served_as_jpeg_is_not_an_image(server):
    page = b"<!DOCTYPE html><html><body>Photo not available</body></html>"
    server.routes["/fake.jpg"] = send(page, content_type="image/jpeg")
    with pytest.raises(FetchError, match=r"not an image: content starts with '<!DOCTYPE html>") \
            as info:
        get(server, "/fake.jpg")
    assert "Content-Type: image/jpeg" in info.value.reason
    assert server.counts["/fake.jpg"] == 1


def test_md5_checked_when_given(server):
    server.routes["/a.jpg"] = send(JPEG)
    good = hashlib.md5(JPEG).hexdigest()
    assert get(server, "/a.jpg", md5=good).data == JPEG
    with pytest.raises(FetchError, match=f"md5 mismatch: expected {'0' * 32}, got {good}"):
        get(server, "/a.jpg", md5="0" * 32)


@pytest.mark.parametrize("fmt", ["PNG", "GIF", "WEBP", "BMP"])
def test_other_image_formats_recognised(server, fmt):
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, fmt)
    server.routes["/img"] = send(buf.getvalue(), content_type="application/octet-stream")
    assert get(server, "/img").format == fmt


def test_connections_are_reused(server):
    server.routes["/a.jpg"] = send(JPEG)
    downloader = HttpDownloader(FAST, connections=1)
    for _ in range(5):
        downloader.get(server.url("/a.jpg"))
    pool = downloader.pool.connection_from_url(server.url("/"))
    assert pool.num_connections == 1 and pool.num_requests == 5
