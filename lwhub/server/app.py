"""The registry's HTTP API (v1): the routes of an ASGI app on Starlette. `openapi.py` documents them.

Errors are ``{"error": {"code", "message", "detail"}}`` (`http.py`) with the status and code of
`lwhub.errors.ERROR_CODES`. Reads need no token; writes need ``Authorization: Bearer``.
Blobs are served by digest as files (whole-file GETs go out through the ASGI
``http.response.pathsend`` extension where the server has it, so the bytes never pass
through Python), with single-range requests answered 206.
"""

from __future__ import annotations

import time
from pathlib import Path

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from lwformat.bundle.keys import key_id, loads_public_key
from lwformat.bundle.limits import (
    MAX_BUNDLE_BYTES,
    MAX_MANIFEST_BYTES,
    MAX_SIGNATURE_BYTES,
)
from lwformat.errors import SigningKeyError

from ..errors import BadRequestError, ForbiddenError, NotFoundError, TooLargeError
from ..protocol import (
    MAX_TTL,
    OWNER,
    TAG,
    BlobInfo,
    NewToken,
    Page,
    PublishRequest,
    SignedVersion,
    TagRequest,
    TokenRequest,
    VersionInfo,
    Whoami,
    YankRequest,
    digest_hex,
)
from ..semver import is_valid
from . import auth, openapi
from .blobs import BlobStore, DirBlobStore
from .http import (
    HANDLERS,
    UPLOAD_IDLE,
    BlobResponse,
    check_range,
    json_answer,
    page_args,
    page_token,
    read_body,
    within_idle,
)
from .publish import publish
from .run import check_upload_idle
from .store import Store, open_store
from .sweep import ORPHAN_GRACE, SWEEP_EVERY, Sweeper

MAX_KEY_BYTES = 16 << 10


def _bundle_path(request: Request) -> tuple[str, str]:
    owner, name = request.path_params["owner"], request.path_params["name"]
    if not OWNER.match(owner) or not OWNER.match(name):
        raise BadRequestError(f"{owner}/{name!s} is not a bundle name 'owner/name' (lowercase, digits, '_.-')", code="invalid_name")
    return owner, name


class Registry:
    """The routes, bound to one metadata store and one blob store."""

    def __init__(self, store: Store, blobs: BlobStore, sweeper: Sweeper, upload_idle: float = UPLOAD_IDLE) -> None:
        self.store, self.blobs, self.sweeper, self.upload_idle = store, blobs, sweeper, upload_idle

    def principal(self, request: Request) -> auth.Principal:
        return auth.authenticate(self.store, request.headers.get("authorization"))

    # -- meta ---------------------------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        return json_answer({"ok": True, "api": "v1", "instance": request.app.state.instance})

    async def openapi(self, request: Request) -> Response:
        return json_answer(openapi.document())

    async def whoami(self, request: Request) -> Response:
        p = self.principal(request)
        return json_answer(Whoami(p.account, list(p.scopes), p.expires))

    async def new_token(self, request: Request) -> Response:
        p = self.principal(request)
        body = await read_body(request, TokenRequest, idle=self.upload_idle)
        scopes = list(p.scopes) if body.scopes is None else body.scopes
        for scope in scopes:
            owner, _, name = scope.partition("/")
            auth.authorize(p, owner, name or None)
        if body.ttl is not None and not (0 < body.ttl < float("inf")):
            raise BadRequestError(f"ttl must be a positive number of seconds, not {body.ttl}", code="invalid_request")
        # A token never outlives the one that made it: an expiring token cannot mint a lasting one.
        # A lifetime past MAX_TTL is cut to it, as it is to the maker's: an expiry every clock can print.
        expires = None if body.ttl is None else time.time() + min(body.ttl, MAX_TTL)
        if p.expires is not None:
            expires = p.expires if expires is None else min(expires, p.expires)
        token = auth.issue_token(self.store, p.account, scopes, expires=expires)
        return json_answer(NewToken(token, p.account, scopes, expires), 201)

    # -- publisher keys -----------------------------------------------------------------------

    async def keys(self, request: Request) -> Response:
        owner = request.path_params["owner"]
        if not OWNER.match(owner):
            raise BadRequestError(f"{owner!r} is not an owner name", code="invalid_name")
        return json_answer(Page(self.store.keys(owner)))

    async def add_key(self, request: Request) -> Response:
        owner = request.path_params["owner"]
        auth.authorize(self.principal(request), owner)
        pem = (await read_body(request, dict[str, str], MAX_KEY_BYTES, self.upload_idle)).get("pem", "")
        try:
            key = loads_public_key(pem.encode(), path="pem")
        except SigningKeyError as exc:
            raise BadRequestError(str(exc), code="invalid_key") from exc
        return json_answer(self.store.add_key(owner, key_id(key), pem), 201)

    # -- blobs --------------------------------------------------------------------------------

    def _blob_hex(self, request: Request) -> str:
        hexdigest = digest_hex(request.path_params["digest"])
        if hexdigest is None:
            raise BadRequestError("a blob is named 'sha256:<64 lowercase hex>'", code="invalid_digest")
        return hexdigest

    async def get_blob(self, request: Request) -> Response:
        hexdigest = self._blob_hex(request)
        path = self.blobs.local_path(hexdigest)
        if path is None:
            raise NotFoundError(f"no blob sha256:{hexdigest}", code="blob_not_found")
        size = path.stat().st_size
        if (header := request.headers.get("range")) is not None:
            check_range(header, size)
        headers = {"etag": f'"sha256:{hexdigest}"', "cache-control": "public, max-age=31536000, immutable"}
        return BlobResponse(path, media_type="application/octet-stream", headers=headers)

    async def put_blob(self, request: Request) -> Response:
        principal = self.principal(request)
        if not principal.scopes:
            raise ForbiddenError("this token has no namespace to publish to", code="namespace_forbidden")
        hexdigest = self._blob_hex(request)
        if (size := self.blobs.size(hexdigest)) is not None:
            return json_answer(BlobInfo(f"sha256:{hexdigest}", size, False))
        declared = request.headers.get("content-length", "").lstrip("0") or "0"  # 1*DIGIT: leading zeros are allowed
        if declared.isascii() and declared.isdigit() and (len(declared) > 19 or int(declared) > MAX_BUNDLE_BYTES):
            raise TooLargeError(f"a blob of {declared} bytes is larger than a bundle may be ({MAX_BUNDLE_BYTES})")
        writer = self.blobs.writer(hexdigest, limit=MAX_BUNDLE_BYTES)
        try:
            async for piece in within_idle(request.stream(), self.upload_idle):
                writer.write(piece)
            created = await run_in_threadpool(writer.commit)
        except ClientDisconnect:
            writer.abort()
            raise BadRequestError("the upload was cut off before its end; nothing was kept", code="invalid_request") from None
        except BaseException:
            writer.abort()
            raise
        self.sweeper.maybe()  # uploads are what leave orphans: sweep stale ones now and then, in the background
        return json_answer(BlobInfo(f"sha256:{hexdigest}", writer.size, created), 201 if created else 200)

    # -- bundles, versions, tags --------------------------------------------------------------

    async def search(self, request: Request) -> Response:
        after, limit = page_args(request)
        found = self.store.search(request.query_params.get("q", ""), after=after, limit=limit)
        return json_answer(Page(found, page_token(found[-1].name) if len(found) == limit else None))

    async def bundle(self, request: Request) -> Response:
        owner, name = _bundle_path(request)
        if (info := self.store.bundle(owner, name)) is None:
            raise NotFoundError(f"no bundle {owner}/{name}", code="bundle_not_found")
        return json_answer(info)

    async def versions(self, request: Request) -> Response:
        owner, name = _bundle_path(request)
        after, limit = page_args(request)
        rows = self.store.versions(owner, name, after=after, limit=limit)
        if not rows and after is None and self.store.bundle(owner, name) is None:
            raise NotFoundError(f"no bundle {owner}/{name}", code="bundle_not_found")
        return json_answer(Page([v for _, v in rows], page_token(rows[-1][0]) if len(rows) == limit else None))

    def _lookup(self, owner: str, name: str, ref: str) -> VersionInfo:
        if not (is_valid(ref) or TAG.match(ref) or ref == "latest"):  # no tag starts with a digit: a bad version
            raise BadRequestError(f"{ref[:80]!r} is neither a semantic version (MAJOR.MINOR.PATCH, numbers of at most "
                                  "20 digits) nor a tag", code="invalid_version")  # fmt: skip
        if is_valid(ref):
            info = self.store.version(owner, name, ref)
        elif ref == "latest":  # always computed, even where an older registry let a tag of that name be set
            info = self.store.latest(owner, name)
        elif (version := self.store.tags(owner, name).get(ref)) is not None:
            info = self.store.version(owner, name, version)
        else:
            info = None
        if info is None:
            if self.store.bundle(owner, name) is None:
                raise NotFoundError(f"no bundle {owner}/{name}", code="bundle_not_found")
            what = "version" if is_valid(ref) else "tag"
            hint = " (every release is yanked or a pre-release)" if ref == "latest" else ""
            raise NotFoundError(f"{owner}/{name} has no {what} {ref!r}{hint}", code=f"{what}_not_found")
        return info

    async def version(self, request: Request) -> Response:
        return json_answer(self._lookup(*_bundle_path(request), request.path_params["version"]))

    async def resolve(self, request: Request) -> Response:
        return json_answer(self._lookup(*_bundle_path(request), request.path_params["ref"]))

    async def resolve_signed(self, request: Request) -> Response:
        info = self._lookup(*_bundle_path(request), request.path_params["ref"])
        manifest, signature = self._small_blob(info.manifest, MAX_MANIFEST_BYTES), self._small_blob(info.signature, MAX_SIGNATURE_BYTES)
        return json_answer(SignedVersion(info, manifest, signature))

    def _small_blob(self, digest: str, limit: int) -> bytes | None:
        """A manifest's or signature's bytes; None when the store cannot give them (the client then fetches by digest)."""
        hexdigest = digest_hex(digest)
        try:
            return None if hexdigest is None else self.blobs.read(hexdigest, limit=limit)
        except (NotFoundError, TooLargeError):
            return None

    async def publish(self, request: Request) -> Response:
        owner, name = _bundle_path(request)
        principal = self.principal(request)
        body = await read_body(request, PublishRequest, idle=self.upload_idle)
        info, made = await run_in_threadpool(publish, self.store, self.blobs, principal, owner, name, request.path_params["version"], body)
        return json_answer(info, 201 if made else 200)

    async def yank(self, request: Request) -> Response:
        owner, name = _bundle_path(request)
        auth.authorize(self.principal(request), owner, name)
        body = await read_body(request, YankRequest, idle=self.upload_idle)
        return json_answer(self.store.yank(owner, name, request.path_params["version"], yanked=body.yanked, reason=body.reason))

    async def set_tag(self, request: Request) -> Response:
        owner, name = _bundle_path(request)
        auth.authorize(self.principal(request), owner, name)
        tag, body = request.path_params["tag"], await read_body(request, TagRequest, idle=self.upload_idle)
        if not TAG.match(tag):
            raise BadRequestError(f"tag {tag!r} must start with a letter (lowercase, digits, '_.-')", code="invalid_name")
        if tag == "latest":  # set by hand, it would outlive the yank of its version and every later release
            raise BadRequestError("the tag 'latest' is the highest release not yanked; it cannot be set", code="invalid_name")
        if self.store.version(owner, name, body.version) is None:
            if self.store.bundle(owner, name) is None:
                raise NotFoundError(f"no bundle {owner}/{name}", code="bundle_not_found")
            raise NotFoundError(f"{owner}/{name} has no version {body.version}", code="version_not_found")
        self.store.set_tag(owner, name, tag, body.version)
        return json_answer({"tag": tag, "version": body.version})


def create_app(data_dir: str | Path, *, instance: str = "", orphan_grace: float = ORPHAN_GRACE,
               sweep_every: float = SWEEP_EVERY, upload_idle: float = UPLOAD_IDLE) -> Starlette:  # fmt: skip
    """The registry app on `data_dir` (``registry.sqlite3``, ``blobs/``, ``tmp/``).

    Unreferenced blobs and temp entries older than `orphan_grace` seconds are swept after
    an upload, at most once every `sweep_every` seconds (`sweep.Sweeper`). A request body
    (an upload, or a small JSON one) that sends nothing for `upload_idle` seconds is dropped.
    """
    check_upload_idle(upload_idle)
    store, blobs = open_store(data_dir), DirBlobStore(data_dir)
    registry = Registry(store, blobs, Sweeper(store, blobs, grace=orphan_grace, every=sweep_every), upload_idle)
    r, bundle = registry, "/v1/bundles/{owner}/{name}"
    routes = [
        Route("/v1/health", r.health),
        Route("/openapi.json", r.openapi),
        Route("/v1/whoami", r.whoami),
        Route("/v1/tokens", r.new_token, methods=["POST"]),
        Route("/v1/owners/{owner}/keys", r.keys),
        Route("/v1/owners/{owner}/keys", r.add_key, methods=["POST"]),
        Route("/v1/blobs/{digest}", r.get_blob, methods=["GET", "HEAD"]),
        Route("/v1/blobs/{digest}", r.put_blob, methods=["PUT"]),
        Route("/v1/bundles", r.search),
        Route(bundle, r.bundle),
        Route(bundle + "/versions", r.versions),
        Route(bundle + "/versions/{version}", r.version),
        Route(bundle + "/versions/{version}", r.publish, methods=["POST"]),
        Route(bundle + "/versions/{version}/yank", r.yank, methods=["POST"]),
        Route(bundle + "/resolve/{ref}", r.resolve),
        Route(bundle + "/resolve/{ref}/signed", r.resolve_signed),
        Route(bundle + "/tags/{tag}", r.set_tag, methods=["PUT"]),
    ]
    app = Starlette(routes=routes, exception_handlers=HANDLERS)
    app.state.instance, app.state.sweeper = instance, registry.sweeper
    return app
