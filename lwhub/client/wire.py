"""The one place where HTTP answers and transport failures become `lwhub` errors.

    {"error": {"code", "message", "detail"}}  ->  lwhub.errors.error_for(code, ...)
    a redirect (3xx)                          ->  ProtocolError naming where to
    any other non-2xx answer                  ->  ServerError ("internal_error") or BadRequestError
    httpx.LocalProtocolError (a bad header)   ->  UsageError, never quoting the header
    httpx.TransportError (refused, reset...)  ->  HubUnavailableError

Every answer is bounded: JSON answers by size (`MAX_ANSWER`, error answers `MAX_ERROR`),
and on the connections `paced` watches, in time: a registry that sends nothing for the
read timeout, or under `MIN_SPEED` bytes a second for `SPEED_TIME` seconds once its
answer began (status line and headers included), is left.
"""

from __future__ import annotations

import contextlib
import ssl
import time
from collections.abc import Callable, Iterator

import httpcore
import httpx
import msgspec

from ..errors import HubUnavailableError, ProtocolError, UsageError, error_for


class _Answer(msgspec.Struct):
    code: str
    message: str
    detail: dict = {}


class _Envelope(msgspec.Struct):
    error: _Answer


def raise_for(response: httpx.Response) -> None:
    """Raise the error a non-2xx answer carries (the body must have been read)."""
    if response.is_success:
        return
    if response.is_redirect or 300 <= response.status_code < 400:  # httpx follows none: say so, not "bad request"
        where = response.headers.get("location", "")[:200] or "no location given"
        raise ProtocolError(f"{response.request.method} {response.url}: the registry redirected (HTTP {response.status_code}) "
                            f"to {where}; lwhub follows no redirects: if the registry moved, give its new URL")  # fmt: skip
    try:
        answer = msgspec.json.decode(response.content, type=_Envelope).error
    except (msgspec.DecodeError, msgspec.ValidationError):
        code = "internal_error" if response.status_code >= 500 else "invalid_request"
        text = response.text[:200].strip() or response.reason_phrase
        raise error_for(code, f"{response.request.method} {response.url}: HTTP {response.status_code}: {text}") from None
    raise error_for(answer.code, answer.message, answer.detail)


MAX_ANSWER = 16 << 20  # a registry's JSON answers are small: a larger one is refused, not buffered
MAX_ERROR = 1 << 20  # of an error answer (JSON, small) only this much is read


def read_capped(streamed: httpx.Response, limit: int, *, truncate: bool = False) -> httpx.Response | None:
    """A streamed answer read into a plain response, never past `limit` bytes.

    Past the limit: None, or with ``truncate`` the answer cut at `limit` bytes.
    """
    body = bytearray()
    for piece in streamed.iter_bytes():
        body += piece
        if len(body) > limit:
            if not truncate:
                return None
            del body[limit:]
            break
    # iter_bytes decoded the body: its encoding and length headers no longer describe it.
    headers = [(k, v) for k, v in streamed.headers.multi_items() if k.lower() not in ("content-encoding", "content-length")]
    return httpx.Response(streamed.status_code, headers=headers, content=bytes(body), request=streamed.request)


def fetch(http: httpx.Client, method: str, url: str, **kwargs) -> httpx.Response:
    """One request whose answer is read whole, but never past `MAX_ANSWER` bytes."""
    with http.stream(method, url, **kwargs) as streamed:
        if (answer := read_capped(streamed, MAX_ANSWER)) is None:
            raise ProtocolError(f"{method} {url}: the answer is larger than {MAX_ANSWER} bytes")
        return answer


def decode(response: httpx.Response, kind: type):
    raise_for(response)
    try:
        return msgspec.json.decode(response.content, type=kind)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ProtocolError(f"{response.request.method} {response.url}: unexpected answer: {exc}") from exc


@contextlib.contextmanager
def reaching(url: str) -> Iterator[None]:
    """Turn a transport failure into `HubUnavailableError` naming the registry."""
    try:
        yield
    except httpx.LocalProtocolError:  # its message quotes the header, which may hold the token
        raise UsageError(f"a request to {url} could not be sent: a header holds characters HTTP does not allow", path=url) from None
    except httpx.ReadTimeout as exc:  # silent for the read timeout, or under the speed floor (`paced`)
        raise HubUnavailableError(f"the registry at {url} answered too slowly ({exc or 'timed out'}); try again", url=url) from exc
    except httpx.TransportError as exc:
        raise HubUnavailableError(f"cannot reach the registry at {url}: {exc or type(exc).__name__}", url=url) from exc
    except httpx.InvalidURL as exc:
        raise UsageError(f"{url!r} is not a URL a registry can be reached at ({exc})", path=url) from None


# -- the speed floor ---------------------------------------------------------------------------

MIN_SPEED, SPEED_TIME = 1024.0, 60.0  # an answer under 1 KiB/s for a minute is left


class Pace:
    """Raises `fail` when reads get under `floor` bytes a second over `window` seconds of
    waiting on the socket (time not spent reading, waiting for a free buffer say, does not
    count). A floor of 0 turns it off.

    The read timeout only catches silence: a registry that sends one byte per timeout
    would hold a request for ever (curl's --speed-limit/--speed-time are the same idea).
    """

    def __init__(self, floor: float, window: float, fail: type[Exception]) -> None:
        self.floor, self.window, self.fail = floor, window, fail
        self.waited, self.got = 0.0, 0

    def add(self, n: int, waited: float) -> None:
        self.got, self.waited = self.got + n, self.waited + waited
        if self.waited >= self.window:
            if self.got < self.floor * self.waited:
                raise self.fail(f"under {self.floor:g} bytes/s for {self.waited:.0f} s: {self.got} bytes came")
            self.waited, self.got = 0.0, 0


class PacedReads:
    """The reads of one connection, each answer held to `Pace` from its first byte on.

    The wait for that first byte is the server's (it may be working out the answer) and is
    bounded by the read timeout alone; what comes after, status line and headers included,
    must keep the floor. A request sent (`sent`) starts the next answer; after `stop` the
    reads go on unwatched (their caller paces them itself).
    """

    def __init__(self, floor: float, window: float, fail: type[Exception]) -> None:
        self.floor, self.window, self.fail = floor, window, fail
        self.pace: Pace | None = None  # None until the answer's first byte
        self.watching = True

    def sent(self) -> None:
        self.pace = None

    def stop(self) -> None:
        self.watching = False

    def read(self, read: Callable, *args):
        """`read(*args)`, timed; returns what it returns (bytes, or a count of bytes)."""
        began = time.monotonic()
        got = read(*args)
        if not self.watching:
            return got
        n = len(got) if isinstance(got, bytes) else got or 0
        if self.pace is not None:
            self.pace.add(n, time.monotonic() - began)
        elif n:
            self.pace = Pace(self.floor, self.window, self.fail)
        return got


class _PacedStream(httpcore.NetworkStream):
    def __init__(self, inner: httpcore.NetworkStream, reads: PacedReads) -> None:
        self.inner, self.reads = inner, reads

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self.reads.read(self.inner.read, max_bytes, timeout)

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self.reads.sent()
        self.inner.write(buffer, timeout)

    def close(self) -> None:
        self.inner.close()

    def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
                  timeout: float | None = None) -> httpcore.NetworkStream:  # fmt: skip
        return _PacedStream(self.inner.start_tls(ssl_context, server_hostname, timeout), self.reads)

    def get_extra_info(self, info: str):
        return self.inner.get_extra_info(info)


class _PacedBackend(httpcore.NetworkBackend):
    def __init__(self, inner: httpcore.NetworkBackend, floor: float, window: float) -> None:
        self.inner, self.floor, self.window = inner, floor, window

    def _paced(self, stream: httpcore.NetworkStream) -> httpcore.NetworkStream:
        return _PacedStream(stream, PacedReads(self.floor, self.window, httpcore.ReadTimeout))

    def connect_tcp(self, *args, **kwargs) -> httpcore.NetworkStream:
        return self._paced(self.inner.connect_tcp(*args, **kwargs))

    def connect_unix_socket(self, *args, **kwargs) -> httpcore.NetworkStream:
        return self._paced(self.inner.connect_unix_socket(*args, **kwargs))

    def sleep(self, seconds: float) -> None:
        self.inner.sleep(seconds)


def paced(http: httpx.Client, floor: float = MIN_SPEED, window: float = SPEED_TIME) -> httpx.Client:
    """`http`, every connection it opens held to the floor (`PacedReads`; httpx reads with a
    per-read timeout only, so a registry dribbling its headers or body would hold a request
    for ever). A slow answer raises `httpx.ReadTimeout`, which `reaching` reports.

    httpx takes no network backend, so this sets one on the connection pools of the client's
    transports (proxies from the environment included): the one place lwhub reaches into
    httpx's and httpcore's private attributes. A transport of another kind is left as it is;
    an httpx whose own transport no longer looks so is refused, rather than left unpaced
    (pyproject keeps httpx below 1.0). HTTP/1.1 only: a request written resets the floor,
    and HTTP/2 writes in mid-answer (lwhub never turns it on).
    """
    unknown = RuntimeError(f"httpx {httpx.__version__}: its client or transport is not laid out as lwhub "
                           "knows it, so the speed floor cannot be set; lwhub supports httpx 0.27 up to 1.0")  # fmt: skip
    try:
        transports = (http._transport, *http._mounts.values())
    except AttributeError:
        raise unknown from None
    for transport in transports:
        pool = getattr(transport, "_pool", None)  # a ConnectionPool, HTTPProxy or SOCKSProxy
        if isinstance(backend := getattr(pool, "_network_backend", None), httpcore.NetworkBackend):
            pool._network_backend = _PacedBackend(backend, floor, window)
        elif type(transport) is httpx.HTTPTransport:  # ours, yet not as this code knows it: say so
            raise unknown
    return http
