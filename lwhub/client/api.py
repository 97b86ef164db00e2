"""`Client`: the registry's API over httpx, with a local cache and a trust store.

Settings are passed in; nothing is read from the environment here (`settings.from_env`
does that for the command line). The HTTP client is injectable (``http=``), so tests
and callers choose transports, proxies and timeouts. Listings are generators that
follow the registry's page tokens.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Self, TypeVar
from urllib.parse import urlsplit

import httpx
import msgspec

from lwformat.bundle.keys import PublicKey, loads_public_key, public_pem

from ..cache import Cache
from ..errors import NotCachedError, ProtocolError, RefError, TooLargeError, UsageError
from ..protocol import (
    API,
    TOKEN,
    BlobInfo,
    BundleInfo,
    KeyInfo,
    NewToken,
    Page,
    TagRequest,
    TokenRequest,
    VersionInfo,
    Whoami,
    YankRequest,
)
from ..semver import is_valid
from ..trust import TrustStore
from . import pull as _pull
from . import push as _push
from .tls import LazyTLS
from .wire import (
    MAX_ERROR,
    MIN_SPEED,
    SPEED_TIME,
    decode,
    fetch,
    paced,
    raise_for,
    reaching,
    read_capped,
)

T = TypeVar("T")
MAX_PAGES = 10_000  # pages one listing may take (500,000 items at the default page size)
MAX_KEY_PAGES = 100  # an owner's keys are a handful: 5,000 at the default page size is already absurd


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lwhub"


def check_token(token: str, source: str = "the token (--token, LWHUB_TOKEN or the saved login)") -> None:
    """Refuse a malformed token before it goes into a header: httpx would report a stray
    CR or space as an unreachable registry, quoting the token, and crash on non-ASCII.
    The message never repeats the token: it is a secret."""
    if not TOKEN.match(token):
        raise UsageError(f"{source} is malformed: a token starts with lwh_, then only letters, digits, '_' and '-' "
                         "(a stray space or line end?); `lwhub account create` or `lwhub token create` prints one")  # fmt: skip


class Client:
    """A registry client. ``offline=True`` serves pulls from the cache and never connects.

    ``trust`` (pinned keys and seen versions: a `TrustStore` or its directory) defaults to the
    one the `lwhub` command uses, ``$LWHUB_HOME/trust`` (`settings.trust_dir`), apart from the
    cache: clearing a cache never drops a pin nor resets rollback protection (a store left in
    ``<cache_dir>/trust``, where clients kept it before, stays in use with a warning). ``streams``
    is how many connections a pull uses at most, by default one per core up to four (each
    stream's receiving thread competes with the hashing for the cores).

    Every answer is bounded in time: a registry that sends nothing for ``timeout`` seconds,
    or, once an answer began, under ``min_speed`` bytes a second for ``speed_time`` seconds,
    is left (`HubUnavailableError`; a blob download retries first). The floor holds on the
    client's own connections and on direct blob downloads; a caller's ``http`` keeps its own
    transport, so there only blob bodies are held to it.
    """

    def __init__(self, url: str | None = None, *, token: str | None = None, cache_dir: str | os.PathLike | None = None,
                 http: httpx.Client | None = None, trust: TrustStore | str | os.PathLike | None = None, offline: bool = False,
                 streams: int | None = None, timeout: float = 60.0, min_speed: float = MIN_SPEED,
                 speed_time: float = SPEED_TIME) -> None:  # fmt: skip
        # settings.py builds clients, so it is imported here, not at the top.
        from .settings import default_trust_root

        if url is None and not offline:  # a login is read only when asked for: lwhub.from_env()
            raise UsageError("a registry URL is needed: Client(url), or lwhub.from_env() for LWHUB_URL or the "
                             "`lwhub login` one (offline=True uses only the cache)")  # fmt: skip
        self.url = (url or "").rstrip("/")
        if not offline and not self.url.lower().startswith(("http://", "https://")):  # httpx would say "unreachable"
            raise UsageError(f"{url!r} is not an http:// or https:// URL", path=url)
        if not offline and _path(self.url) == API:  # every request adds it: /v1/v1/... answers 404s
            raise UsageError(f"{url!r}: give the registry's root URL, without {API}", path=url)
        if token and not offline:  # offline, it is never sent
            check_token(token)
        self.token = token
        self.offline = offline
        self.streams = max(1, streams if streams is not None else min(4, os.cpu_count() or 1))
        self.hashers = max(2, os.cpu_count() or 2)
        self.min_speed, self.speed_time = min_speed, speed_time
        self.cache = Cache(cache_dir if cache_dir is not None else default_cache_dir())
        self.trust = trust if isinstance(trust, TrustStore) else TrustStore(default_trust_root(self.cache.root) if trust is None else trust)
        self._own_http = http is None
        limits = httpx.Limits(max_connections=max(8, 2 * self.streams), max_keepalive_connections=max(8, 2 * self.streams))
        # TLS set-up waits for the first https connection (a plain-HTTP registry never pays for it).
        self.http = http if http is not None else paced(httpx.Client(timeout=timeout, limits=limits, verify=LazyTLS()), min_speed, speed_time)

    def close(self) -> None:
        if self._own_http:
            self.http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the wire ------------------------------------------------------------------------------

    def _headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.token}"} if self.token else {}

    def _online(self) -> None:
        if self.offline:
            raise NotCachedError("this client is offline: only pulls of cached bundles work")

    def get(self, path: str, kind: type[T], params: dict | None = None) -> T:
        self._online()
        with reaching(self.url):
            return decode(fetch(self.http, "GET", self.url + path, params=params, headers=self._headers()), kind)

    def post(self, path: str, body: object, kind: type[T], method: str = "POST") -> T:
        self._online()
        with reaching(self.url):
            response = fetch(self.http, method, self.url + path, content=msgspec.json.encode(body),
                             headers=self._headers() | {"content-type": "application/json"})  # fmt: skip
            return decode(response, kind)

    def pages(self, path: str, kind: type[T], params: dict | None = None, page_size: int = 50,
              max_pages: int = MAX_PAGES) -> Iterator[T]:  # fmt: skip
        params, seen = dict(params or {}, limit=page_size), set()
        while True:
            page = self.get(path, Page[kind], params)
            yield from page.items
            if page.next is None:
                return
            # The registry pages on only after a full page, with a new token each time: either would never end.
            if not page.items:
                raise ProtocolError(f"{path}: an empty page names a next one")
            if page.next in seen:
                raise ProtocolError(f"{path}: the registry names page {page.next!r} a second time")
            if len(seen) + 1 >= max_pages:  # fresh tokens for ever would never end either
                raise ProtocolError(f"{path}: the registry names a next page after {max_pages} pages; a listing this long is refused")
            seen.add(page.next)
            params["page"] = page.next

    def blob_url(self, hexdigest: str) -> str:
        return f"{self.url}{API}/blobs/sha256:{hexdigest}"

    def has_blob(self, hexdigest: str) -> bool:
        self._online()
        with reaching(self.url):
            response = self.http.head(self.blob_url(hexdigest))
        if response.status_code == 404:
            return False
        raise_for(response)
        return True

    def put_blob(self, hexdigest: str, content: Iterator[bytes] | bytes, size: int) -> BlobInfo:
        self._online()
        with reaching(self.url):
            response = fetch(self.http, "PUT", self.blob_url(hexdigest), content=content,
                             headers=self._headers() | {"content-length": str(size), "content-type": "application/octet-stream"})  # fmt: skip
            return decode(response, BlobInfo)

    def blob_bytes(self, digest: str, limit: int) -> bytes:
        """A small blob (manifest, signature), refused past `limit` bytes."""
        self._online()
        with reaching(self.url), self.http.stream("GET", f"{self.url}{API}/blobs/{digest}") as response:
            if not response.is_success:  # an error answer is small: only its start is read
                raise_for(read_capped(response, MAX_ERROR, truncate=True))
            data = bytearray()
            for piece in response.iter_bytes():
                data += piece
                if len(data) > limit:
                    raise TooLargeError(f"blob {digest} is larger than the {limit} bytes allowed", code="too_large")
            return bytes(data)

    # -- accounts and keys -----------------------------------------------------------------

    def whoami(self) -> Whoami:
        return self.get(f"{API}/whoami", Whoami)

    def new_token(self, scopes: list[str] | None = None, ttl: float | None = None) -> NewToken:
        return self.post(f"{API}/tokens", TokenRequest(scopes, ttl), NewToken)

    def keys(self, owner: str) -> list[KeyInfo]:
        return list(self.pages(f"{API}/owners/{owner}/keys", KeyInfo, max_pages=MAX_KEY_PAGES))

    def register_key(self, owner: str, key: PublicKey | bytes | str | os.PathLike) -> KeyInfo:
        """Register a publisher public key (key object, PEM bytes or PEM path) for `owner`."""
        if isinstance(key, (str, os.PathLike)):
            key = loads_public_key(Path(key).read_bytes(), path=str(key))  # errors name the file
        pem = public_pem(key if isinstance(key, PublicKey) else loads_public_key(key))
        return self.post(f"{API}/owners/{owner}/keys", {"pem": pem.decode()}, KeyInfo)

    # -- bundles -------------------------------------------------------------------------------

    def info(self, name: str) -> BundleInfo:
        owner, short, _ = _pull.parse_ref(name)
        return self.get(f"{API}/bundles/{owner}/{short}", BundleInfo)

    def versions(self, name: str, *, page_size: int = 50) -> Iterator[VersionInfo]:
        owner, short, _ = _pull.parse_ref(name)
        return self.pages(f"{API}/bundles/{owner}/{short}/versions", VersionInfo, page_size=page_size)

    def search(self, query: str = "", *, page_size: int = 50) -> Iterator[BundleInfo]:
        return self.pages(f"{API}/bundles", BundleInfo, {"q": query}, page_size=page_size)

    def resolve(self, ref: str) -> VersionInfo:
        """``owner/name[@version|@tag]`` -> the version record (offline: from the cache)."""
        owner, short, want = _pull.parse_ref(ref)
        if not self.offline:
            return self.get(f"{API}/bundles/{owner}/{short}/resolve/{want}", VersionInfo)
        full = f"{owner}/{short}"
        version = want if is_valid(want) else self.cache.cached_tag(full, want) or (self.cache.cached_latest(full) if want == "latest" else None)
        info = self.cache.cached_version(full, version) if version else None
        if info is None:
            raise NotCachedError(f"{ref} is not in the cache at {self.cache.root} (offline)", path=str(self.cache.root))
        return info

    def yank(self, ref: str, *, reason: str = "", undo: bool = False) -> VersionInfo:
        owner, short, version = _pull.parse_ref(ref)
        if not is_valid(version):
            raise RefError(f"{ref!r}: yank needs an explicit version, 'owner/name@1.2.3'", path=ref)
        return self.post(f"{API}/bundles/{owner}/{short}/versions/{version}/yank", YankRequest(not undo, reason), VersionInfo)

    def set_tag(self, name: str, tag: str, version: str) -> dict:
        owner, short, _ = _pull.parse_ref(name)
        return self.post(f"{API}/bundles/{owner}/{short}/tags/{tag}", TagRequest(version), dict, method="PUT")

    def push(self, bundle_dir: str | os.PathLike, name: str | None = None, version: str | None = None,
             *, progress: Callable[[int], None] | None = None) -> VersionInfo:  # fmt: skip
        """Upload a signed bundle directory and publish it; returns the new version's record."""
        return _push.push(self, Path(bundle_dir), name, version, progress=progress)

    def pull(self, ref: str, *, tofu: bool = False, allow_rollback: bool = False,
             progress: Callable[[int], None] | None = None) -> Path:  # fmt: skip
        """Verified download into the cache; returns the bundle directory (`Bundle.open` reads it)."""
        return _pull.pull(self, ref, tofu=tofu, allow_rollback=allow_rollback, progress=progress)


def _path(url: str) -> str:
    try:
        return urlsplit(url).path
    except ValueError as exc:  # a malformed host ("http://[::1")
        raise UsageError(f"{url!r} is not a URL a registry can be reached at ({exc})", path=url) from None

