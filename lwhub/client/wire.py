"""The one place where HTTP answers and transport failures become `lwhub` errors.

    {"error": {"code", "message", "detail"}}  ->  lwhub.errors.error_for(code, ...)
    a redirect (3xx)                          ->  ProtocolError naming where to
    any other non-2xx answer                  ->  ServerError ("internal_error") or BadRequestError
    httpx.LocalProtocolError (a bad header)   ->  UsageError, never quoting the header
    httpx.TransportError (refused, reset...)  ->  HubUnavailableError
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

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
    except httpx.TransportError as exc:
        raise HubUnavailableError(f"cannot reach the registry at {url}: {exc or type(exc).__name__}", url=url) from exc
    except httpx.InvalidURL as exc:
        raise UsageError(f"{url!r} is not a URL a registry can be reached at ({exc})", path=url) from None
