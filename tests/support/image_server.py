"""A real HTTP server on 127.0.0.1 for download tests: good images and every hostile host.

Each path maps to a behaviour `(handler, n)` where n counts that path's requests from 1, so a
test can script "500, 500, then the image". Every request is counted per path: a resume test
asserts that a second run asks for nothing.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

Behaviour = Callable[[BaseHTTPRequestHandler, int], None]


def send(data: bytes, status: int = 200, content_type: str = "image/jpeg",
         headers: dict[str, str] | None = None) -> Behaviour:
    def behaviour(h: BaseHTTPRequestHandler, n: int) -> None:
        h.send_response(status)
        h.send_header("Content-Type", content_type)
        h.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            h.send_header(name, value)
        h.end_headers()
        h.wfile.write(data)
    return behaviour


def status(code: int, headers: dict[str, str] | None = None) -> Behaviour:
    return send(f"<html><body>{code}</body></html>".encode(), code, "text/html", headers)


def redirect(location: str, code: int = 302) -> Behaviour:
    return send(b"", code, "text/html", {"Location": location})


def sequence(*behaviours: Behaviour) -> Behaviour:
    """The n-th request gets the n-th behaviour; the last one repeats."""
    def behaviour(h: BaseHTTPRequestHandler, n: int) -> None:
        behaviours[min(n, len(behaviours)) - 1](h, n)
    return behaviour


def drip(data: bytes, every: float) -> Behaviour:
    """Slow loris: the right Content-Length, then one byte per `every` seconds."""
    def behaviour(h: BaseHTTPRequestHandler, n: int) -> None:
        h.send_response(200)
        h.send_header("Content-Type", "image/jpeg")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        for i in range(len(data)):
            h.wfile.write(data[i:i + 1])
            h.wfile.flush()
            time.sleep(every)
    return behaviour


def reset_after(data: bytes, sent: int) -> Behaviour:
    """Promise all of `data`, send `sent` bytes, then reset the connection (RST)."""
    def behaviour(h: BaseHTTPRequestHandler, n: int) -> None:
        h.send_response(200)
        h.send_header("Content-Type", "image/jpeg")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data[:sent])
        h.wfile.flush()
        time.sleep(0.05)
        h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        h.connection.close()
        h.close_connection = True
    return behaviour


def huge(length: int, head: bytes, hold: float = 5.0) -> Behaviour:
    """Announce `length` bytes, send `head`, then hold the connection open."""
    def behaviour(h: BaseHTTPRequestHandler, n: int) -> None:
        h.send_response(200)
        h.send_header("Content-Type", "image/jpeg")
        h.send_header("Content-Length", str(length))
        h.end_headers()
        h.wfile.write(head)
        h.wfile.flush()
        h.server.holds.wait(hold)  # type: ignore[attr-defined]
        h.close_connection = True
    return behaviour


def endless(head: bytes, chunk: int = 1 << 16) -> Behaviour:
    """No Content-Length: stream until the client hangs up (size limit while streaming)."""
    def behaviour(h: BaseHTTPRequestHandler, n: int) -> None:
        h.send_response(200)
        h.send_header("Content-Type", "image/jpeg")
        h.send_header("Connection", "close")
        h.end_headers()
        h.close_connection = True
        h.wfile.write(head)
        filler = b"\0" * chunk
        try:
            for _ in range(100_000):
                h.wfile.write(filler)
        except OSError:
            pass
    return behaviour


def stall(seconds: float, then: Behaviour) -> Behaviour:
    """Say nothing for `seconds` before answering (read timeout before the headers)."""
    def behaviour(h: BaseHTTPRequestHandler, n: int) -> None:
        if h.server.holds.wait(seconds):  # type: ignore[attr-defined]
            return
        then(h, n)
    return behaviour


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as real hosts do

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        server = self.server
        path = self.path.split("?", 1)[0]
        with server.lock:  # type: ignore[attr-defined]
            server.counts[path] += 1  # type: ignore[attr-defined]
            n = server.counts[path]  # type: ignore[attr-defined]
        behaviour = server.routes.get(path)  # type: ignore[attr-defined]
        if behaviour is None:
            status(404)(self, n)
            return
        try:
            behaviour(self, n)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def log_message(self, *args) -> None:
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        pass  # hostile behaviours break connections on purpose


class ImageServer:
    """`with ImageServer() as server: server.routes["/a.jpg"] = send(data); server.url("/a.jpg")`"""

    def __init__(self) -> None:
        self.httpd = _Server(("127.0.0.1", 0), _Handler)
        self.httpd.routes = {}  # type: ignore[attr-defined]
        self.httpd.counts = Counter()  # type: ignore[attr-defined]
        self.httpd.lock = threading.Lock()  # type: ignore[attr-defined]
        self.httpd.holds = threading.Event()  # type: ignore[attr-defined]
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True)

    @property
    def routes(self) -> dict[str, Behaviour]:
        return self.httpd.routes  # type: ignore[attr-defined]

    @property
    def counts(self) -> Counter:
        return self.httpd.counts  # type: ignore[attr-defined]

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def __enter__(self) -> "ImageServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.holds.set()  # type: ignore[attr-defined]
        self.httpd.shutdown()
        self.httpd.server_close()
