"""HTTP(S) image downloads that a hostile or flaky host cannot hang, flood or fool.

One `urllib3.PoolManager` (thread-safe, keep-alive pools) is shared by all download threads.
Retries are ours, not urllib3's `Retry`: urllib3 neither caps `Retry-After` nor retries a body
that breaks off mid-stream, and both matter at scale. Every request has connect/read timeouts
and the whole body a deadline (a slow-loris host dripping a byte a second never trips a read
timeout); the body size is checked against `Content-Length` before reading and counted while
streaming; the first bytes must be an image's magic bytes (`content.require_image`).

A failure's `kind` is a short stable key (`http 404`, `http 503`, `timeout`, `connection
refused`, `too large`, `not an image`, `redirect loop`, ...): the fetch summary counts failures
by it, and each failure's reason starts with it.
"""

from __future__ import annotations

import errno
import hashlib
import random
import socket
import time
from dataclasses import dataclass
from types import ModuleType
from urllib.parse import urljoin, urlsplit

from odapi_operators.core.data.content import SNIFF_BYTES, ContentError, check_md5, require_image

REDIRECTS = (301, 302, 303, 307, 308)
CHUNK = 1 << 16


def _urllib3() -> ModuleType:
    """urllib3 (and its exceptions), imported by the first download: a fetch that downloads
    nothing (a re-run, local files) does not pay a third of its start-up for it."""
    import urllib3
    import urllib3.exceptions

    return urllib3


@dataclass(frozen=True)
class DownloadPolicy:
    """Limits for one image download; the defaults suit public image hosts."""

    connect_timeout: float = 10.0
    read_timeout: float = 20.0      # longest silence between two packets
    deadline: float = 90.0          # the whole exchange, headers to last byte
    retries: int = 3                # extra attempts after timeouts, resets, 429 and 5xx
    backoff: float = 0.5            # first retry waits up to this long (full jitter), doubling
    backoff_max: float = 20.0
    retry_after_max: float = 60.0   # a longer Retry-After is cut to this
    max_redirects: int = 5
    max_bytes: int = 50 << 20
    user_agent: str = "odapi-image-fetch/1.0"


class FetchError(Exception):
    """One image could not be fetched: `kind` (a short stable key) and `detail`; `reason`,
    `<kind>: <detail>`, is what the failure list shows."""

    def __init__(self, kind: str, detail: str, retryable: bool = False,
                 retry_after: float | None = None):
        super().__init__(kind, detail)
        self.kind, self.detail = kind, detail
        self.retryable = retryable
        self.retry_after = retry_after
        self.attempts = 1

    @property
    def reason(self) -> str:
        tries = f" (after {self.attempts} attempts)" if self.attempts > 1 else ""
        return f"{self.kind}: {self.detail}{tries}"

    def __str__(self) -> str:
        return self.reason


@dataclass(frozen=True)
class Fetched:
    data: bytes
    format: str
    url: str        # after redirects
    attempts: int


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    import email.utils  # here: most runs never see an HTTP date

    try:
        when = email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    return max(0.0, when - (time.time() if now is None else now))


class HttpDownloader:
    """Thread-safe: one instance serves every download thread of a stage."""

    def __init__(self, policy: DownloadPolicy | None = None, connections: int = 64):
        self.policy = policy or DownloadPolicy()
        self.pool = _urllib3().PoolManager(num_pools=max(16, connections // 4), maxsize=connections,
                                        block=False, retries=False,
                                        headers={"User-Agent": self.policy.user_agent,
                                                 "Accept": "image/*,*/*;q=0.5",
                                                 "Accept-Encoding": "identity"})

    def get(self, url: str, md5: str | None = None) -> Fetched:
        """The image at `url`, retried per the policy; raises FetchError with the last reason."""
        policy, attempt = self.policy, 0
        while True:
            try:
                data, fmt, final = self._attempt(url, md5)
                return Fetched(data, fmt, final, attempt + 1)
            except FetchError as exc:
                if not exc.retryable or attempt >= policy.retries:
                    exc.attempts = attempt + 1
                    raise
                if exc.retry_after is not None:
                    delay = min(exc.retry_after, policy.retry_after_max)
                else:
                    cap = min(policy.backoff_max, policy.backoff * 2 ** attempt)
                    delay = random.uniform(0, cap)  # full jitter: retries do not march in step
                attempt += 1
                time.sleep(delay)

    def _attempt(self, url: str, md5: str | None) -> tuple[bytes, str, str]:
        policy, urllib3 = self.policy, _urllib3()
        deadline = time.monotonic() + policy.deadline
        seen = [url]
        for _ in range(policy.max_redirects + 1):
            if urlsplit(url).scheme not in ("http", "https"):
                raise FetchError("unsupported scheme", f"not an http(s) URL: {url!r}")
            remaining = deadline - time.monotonic()
            timeout = urllib3.Timeout(connect=min(policy.connect_timeout, remaining),
                                      read=min(policy.read_timeout, remaining))
            try:
                response = self.pool.request("GET", url, redirect=False, preload_content=False,
                                             timeout=timeout)
            except (urllib3.exceptions.HTTPError, OSError) as exc:  # timeouts are HTTPErrors
                raise _transport_error(exc) from None
            complete = False
            try:
                if response.status in REDIRECTS:
                    location = response.headers.get("Location")
                    if not location:
                        raise FetchError("redirect without location",
                                         f"HTTP {response.status} with no Location header")
                    url = urljoin(url, location)
                    if url in seen:
                        raise FetchError("redirect loop", " -> ".join([*seen, url]))
                    seen.append(url)
                    continue
                result = self._body(response, md5, deadline) + (url,)
                complete = True
                return result
            finally:
                if not complete:
                    response.close()  # a connection with an unread body must not be reused
                response.release_conn()
        raise FetchError("too many redirects", f"more than {policy.max_redirects} "
                                               f"({' -> '.join(seen[-3:])})")

    def _body(self, response, md5: str | None, deadline: float) -> tuple[bytes, str]:
        policy, urllib3 = self.policy, _urllib3()
        if response.status != 200:
            raise _status_error(response)
        length = response.headers.get("Content-Length")
        if length and length.strip().isdigit() and int(length) > policy.max_bytes:
            raise FetchError("too large",
                             f"Content-Length {int(length)} > limit {policy.max_bytes}")
        chunks: list[bytes] = []
        size, fmt = 0, None
        digest = hashlib.md5(usedforsecurity=False) if md5 else None
        try:
            while True:
                if time.monotonic() > deadline:
                    raise FetchError("deadline exceeded", f"body incomplete after "
                                     f"{policy.deadline:g} s ({size} bytes)", retryable=True)
                chunk = response.read1(CHUNK)
                if not chunk:
                    break
                size += len(chunk)
                if size > policy.max_bytes:
                    raise FetchError("too large", f"body exceeds limit {policy.max_bytes} bytes")
                chunks.append(chunk)
                if digest:
                    digest.update(chunk)
                if fmt is None and (size >= SNIFF_BYTES):
                    fmt = require_image(b"".join(chunks)[:SNIFF_BYTES])
        except ContentError as exc:
            raise FetchError(exc.kind, f"{exc.detail} "
                             f"(Content-Type: {response.headers.get('Content-Type')})") from None
        except (urllib3.exceptions.HTTPError, OSError) as exc:  # timeouts are HTTPErrors
            raise _transport_error(exc, size) from None
        data = b"".join(chunks)
        try:
            if fmt is None:
                fmt = require_image(data)
            if digest:
                check_md5(digest.hexdigest(), md5)
        except ContentError as exc:
            raise FetchError(exc.kind, exc.detail) from None
        return data, fmt


def _status_error(response) -> FetchError:
    """`http <status>`; 429 and 5xx are retryable, after their Retry-After if they give one."""
    status = response.status
    detail = f"HTTP {status} {response.reason or ''}".strip()
    if status == 429 or 500 <= status < 600:
        return FetchError(f"http {status}", detail, retryable=True,
                          retry_after=parse_retry_after(response.headers.get("Retry-After")))
    return FetchError(f"http {status}", detail)


def _transport_error(exc: BaseException, received: int | None = None) -> FetchError:
    """Timeouts and connection failures are retryable; the reason keeps urllib3's detail."""
    where = "" if received is None else f"after {received} body bytes: "
    detail = str(exc).split(": ", 1)[-1] if ": " in str(exc) else str(exc)
    return FetchError(_transport_kind(exc), f"{where}{type(exc).__name__}: {detail[:200]}",
                      retryable=True)


def _transport_kind(exc: BaseException) -> str:
    """The failure's key, from urllib3's exception and the OS error it wraps."""
    import ssl

    from urllib3.exceptions import NameResolutionError, NewConnectionError, ProtocolError
    from urllib3.exceptions import SSLError as Urllib3SSLError
    from urllib3.exceptions import TimeoutError as Urllib3Timeout

    causes = _causes(exc)
    errnos = {c.errno for c in causes if isinstance(c, OSError)}
    if any(isinstance(c, ConnectionRefusedError) for c in causes) or errno.ECONNREFUSED in errnos:
        return "connection refused"
    if any(isinstance(c, ConnectionResetError) for c in causes) or errno.ECONNRESET in errnos:
        return "connection reset"
    if any(isinstance(c, (NameResolutionError, socket.gaierror)) for c in causes):
        return "name not resolved"
    if any(isinstance(c, (Urllib3SSLError, ssl.SSLError)) for c in causes):
        return "tls error"
    # NewConnectionError subclasses urllib3's timeout error, but a failed connect is no timeout
    if any(isinstance(c, (Urllib3Timeout, TimeoutError)) and not isinstance(c, NewConnectionError)
           for c in causes):
        return "timeout"
    if any(isinstance(c, ProtocolError) for c in causes):
        return "connection broken"  # closed mid-response: a body shorter than announced
    return "connection error"


def _causes(exc: BaseException) -> list[BaseException]:
    """`exc`, the exceptions it was raised from and those urllib3 carries in its args."""
    found: list[BaseException] = []
    todo = [exc]
    while todo and len(found) < 16:
        current = todo.pop()
        if current in found:
            continue
        found.append(current)
        todo += [e for e in (current.__cause__, current.__context__, *current.args)
                 if isinstance(e, BaseException)]
    return found
