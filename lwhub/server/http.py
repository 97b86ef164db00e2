"""HTTP plumbing of the registry: JSON answers, error answers, bounded bodies, page tokens, ranges.

An error answer is ``{"error": {"code", "message", "detail"}}`` with the HTTP status of
the code's class in `lwhub.errors.ERROR_CODES`. A page token is the url-safe base64 of
the store's cursor (the last item's sort key).
"""

from __future__ import annotations

import asyncio
import base64
import os
import re
import time
from collections.abc import AsyncIterator

import anyio
import msgspec
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, Response
from starlette.routing import Match
from starlette.types import Send

from ..errors import BadRequestError, MethodNotAllowedError, NotFoundError, RangeError, RegistryError, ServerError, TooLargeError
from ..protocol import MAX_PAGE

SPEC = re.compile(r"([0-9]{0,19})-([0-9]{0,19})")  # one byte range of a Range header: first-last, first- or -suffix


def json_answer(obj: object, status: int = 200) -> Response:
    return Response(msgspec.json.encode(obj), status_code=status, media_type="application/json")


def error_answer(exc: RegistryError) -> Response:
    body = {"error": {"code": exc.code, "message": str(exc), "detail": exc.detail}}
    headers = {"www-authenticate": "Bearer"} if exc.status == 401 else None
    response = Response(msgspec.json.encode(body), status_code=exc.status, media_type="application/json", headers=headers)
    if exc.code == "range_not_satisfiable":
        response.headers["content-range"] = f"bytes */{exc.detail['size']}"
    elif exc.code == "method_not_allowed":
        response.headers["allow"] = exc.detail["allow"]
    return response


UPLOAD_IDLE = 60.0  # seconds a request body may send nothing before it is dropped (an upload's temp file with it)


async def within_idle(pieces: AsyncIterator[bytes], idle: float, what: str = "the upload") -> AsyncIterator[bytes]:
    """`pieces`, ended by a BadRequestError when none arrives for `idle` seconds (a stalled
    client would otherwise hold its connection, and an upload's temp file, as long as it likes)."""
    it = aiter(pieces)
    while True:
        try:
            async with asyncio.timeout(idle):  # around the wait only, never across a yield
                piece = await anext(it)
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise BadRequestError(f"{what} sent nothing for {idle:g} s; it was dropped and nothing was kept",
                                  code="invalid_request") from None  # fmt: skip
        yield piece


async def read_body(request: Request, kind: type, limit: int = 64 << 10, idle: float = UPLOAD_IDLE):
    data = bytearray()
    try:
        async for piece in within_idle(request.stream(), idle, "the request body"):
            data += piece
            if len(data) > limit:
                raise TooLargeError(f"the request body is over {limit} bytes")
    except ClientDisconnect:  # cut short, or framing the server could not read
        raise BadRequestError("the request body was cut off before its end", code="invalid_request") from None
    try:
        return msgspec.json.decode(data or b"{}", type=kind)
    except msgspec.ValidationError as exc:
        raise BadRequestError(f"request body: {exc}", code="invalid_request") from exc
    except msgspec.DecodeError as exc:
        raise BadRequestError(f"request body is not JSON: {exc}", code="invalid_request") from exc


def page_args(request: Request) -> tuple[str | None, int]:
    token, limit = request.query_params.get("page"), request.query_params.get("limit", "50")
    if not (limit.isascii() and limit.isdigit() and len(limit) <= 4) or not 1 <= int(limit) <= MAX_PAGE:
        raise BadRequestError(f"limit must be an integer from 1 to {MAX_PAGE}", code="invalid_request")
    if token is None:
        return None, int(limit)
    try:  # validate: the url-safe decoder would drop characters outside its alphabet and read "" for "!!!"
        cursor = base64.b64decode(token.encode(), altchars=b"-_", validate=True).decode()
    except (ValueError, UnicodeDecodeError):
        cursor = ""
    if not cursor:  # page_token never makes an empty one
        raise BadRequestError("page is not a token this registry gave out", code="invalid_request")
    return cursor, int(limit)


def page_token(cursor: str) -> str:
    return base64.urlsafe_b64encode(cursor.encode()).decode()


class BlobResponse(FileResponse):
    """A blob file. Whole files go out through pathsend where the server has it; Starlette
    parses ranges, and a single range is read here, in the event loop while reads are fast.

    Starlette reads each chunk on a worker thread; that hop per MiB cost the server about
    10 ms of CPU (of 50) per 109 MB pull in two ranged streams. From the page cache (where
    the blobs being pulled usually are) a 1 MiB `pread` is one copy, about 0.04 ms, so it
    runs in the loop. A read that takes longer than `inline_read_limit` came from the disk:
    the rest of that range is read on a thread, so a cold or slow disk stalls the loop for
    one read per response, not for the whole transfer.
    """

    chunk_size = 1 << 20  # large reads keep the Python side cheap
    inline_read_limit = 0.002  # seconds; a cached 1 MiB read takes ~0.04, a cold SSD read ~2

    async def _handle_single_range(self, send: Send, start: int, end: int, file_size: int, send_header_only: bool) -> None:
        replaced = (b"content-length", b"content-range")
        headers = [(k, v) for k, v in self.raw_headers if k not in replaced] + [
            (b"content-range", f"bytes {start}-{end - 1}/{file_size}".encode()),
            (b"content-length", str(end - start).encode()),
        ]
        await send({"type": "http.response.start", "status": 206, "headers": headers})
        if not send_header_only:
            with open(self.path, "rb", buffering=0) as f:
                fd = f.fileno()
                if hasattr(os, "posix_fadvise"):  # not on macOS
                    os.posix_fadvise(fd, start, end - start, os.POSIX_FADV_WILLNEED)
                inline = True
                while start < end:
                    size = min(self.chunk_size, end - start)
                    if inline:
                        began = time.perf_counter()
                        piece = os.pread(fd, size, start)
                        inline = time.perf_counter() - began <= self.inline_read_limit
                    else:
                        piece = await anyio.to_thread.run_sync(os.pread, fd, size, start)
                    if not piece:  # cut short under us: the body ends early, and the client retries
                        break
                    start += len(piece)
                    await send({"type": "http.response.body", "body": piece, "more_body": start < end})
        if send_header_only or start < end:
            await send({"type": "http.response.body", "body": b"", "more_body": False})


def check_range(header: str, size: int) -> None:
    """Answer in JSON what Starlette would answer in plain text: a Range header that is not
    ``bytes=`` and byte ranges (400), or whose ranges all lie outside the blob (416)."""
    unit, _, specs = header.replace(" ", "").partition("=")
    parts = [SPEC.fullmatch(spec) for spec in specs.split(",")]
    if unit != "bytes" or not all(m and (m[1] or m[2]) for m in parts):
        raise BadRequestError(f"range {header!r} is not 'bytes=' and byte ranges (first-last, first-, -suffix) of at most "
                              "19 digits", code="invalid_request")  # fmt: skip
    if any(m[1] and m[2] and int(m[2]) < int(m[1]) for m in parts):
        raise BadRequestError(f"range {header!r} has a range that ends before it starts", code="invalid_request")
    if not all((int(m[1]) < size) if m[1] else (size > 0 and int(m[2]) > 0) for m in parts):  # Starlette wants each
        raise RangeError(f"range {header!r} is outside the blob's {size} bytes", detail={"size": size})


async def registry_error(request: Request, exc: RegistryError) -> Response:
    return error_answer(exc)


async def http_error(request: Request, exc: HTTPException) -> Response:
    where = f"{request.method} {request.url.path}: {exc.detail}"
    if exc.status_code == 405:  # a path may be several routes (GET and POST apart): their methods together
        methods = {m for route in request.app.routes if route.matches(request.scope)[0] != Match.NONE for m in route.methods or ()}
        allow = ", ".join(sorted(methods)) or (exc.headers or {}).get("Allow", "")
        return error_answer(MethodNotAllowedError(f"{where} (this path takes {allow})", detail={"allow": allow}))
    error = NotFoundError(where, code="not_found") if exc.status_code == 404 else BadRequestError(where, code="invalid_request")
    return error_answer(error)


async def internal_error(request: Request, exc: Exception) -> Response:
    return error_answer(ServerError(f"internal error ({type(exc).__name__}); the request changed nothing", code="internal_error"))


HANDLERS = {RegistryError: registry_error, HTTPException: http_error, Exception: internal_error}
