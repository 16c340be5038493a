"""A small asyncio HTTP/1.1 image server for the benchmarks (a module and a script).

Serves every file of a folder at /<name>, optionally answering each request after a delay
(real image hosts take hundreds of ms). asyncio rather than a thread per connection, so a
delayed server holds hundreds of waiting requests without becoming the bottleneck it measures.
GET /__count returns how many image requests it has answered (a re-run must make none).

    python bench/_image_server.py --dir IMAGES [--delay 0.2]   # prints the port
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path


class _Server:
    def __init__(self, folder: Path, delay: float):
        self.files = {f"/{p.name}": p.read_bytes() for p in folder.iterdir() if p.is_file()}
        self.delay = delay
        self.count = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                request = await reader.readuntil(b"\r\n\r\n")
                path = request.split(b" ", 2)[1].decode().split("?", 1)[0]
                if path == "/__count":
                    body, status, kind = json.dumps({"requests": self.count}).encode(), 200, \
                        "application/json"
                else:
                    self.count += 1
                    if self.delay:
                        await asyncio.sleep(self.delay)
                    body = self.files.get(path)
                    status, kind = (200, "image/jpeg") if body is not None else (404, "text/plain")
                    body = body if body is not None else b"not found"
                writer.write(f"HTTP/1.1 {status} X\r\nContent-Type: {kind}\r\n"
                             f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()


async def _serve(folder: Path, delay: float, port: int) -> None:
    state = _Server(folder, delay)
    server = await asyncio.start_server(state.handle, "127.0.0.1", port, backlog=2048)
    print(server.sockets[0].getsockname()[1], flush=True)
    async with server:
        await server.serve_forever()


class ImageServer:
    """Run the server in its own process (it must not share the GIL with a client measured)."""

    def __init__(self, folder: Path, delay: float = 0.0):
        self.process = subprocess.Popen([sys.executable, __file__, "--dir", str(folder),
                                         "--delay", str(delay)], stdout=subprocess.PIPE,
                                        text=True)
        self.port = int(self.process.stdout.readline())

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    def requests(self) -> int:
        with urllib.request.urlopen(self.url("__count"), timeout=10) as response:
            return json.load(response)["requests"]

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(10)

    def __enter__(self) -> "ImageServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", required=True, type=Path)
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--seconds", type=float, default=3600, help="stop after this long")
    args = parser.parse_args()
    try:
        asyncio.run(asyncio.wait_for(_serve(args.dir, args.delay, args.port), args.seconds))
    except (KeyboardInterrupt, asyncio.TimeoutError):
        pass
    os._exit(0)
