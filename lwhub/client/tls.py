"""The client's TLS context, built on the first TLS connection instead of with the client.

httpx builds its SSL context when an `httpx.Client` is made, loading the whole CA bundle
(~20 ms), even for a registry spoken to over plain HTTP. `LazyTLS` is passed as httpx's
``verify=``: httpx hands it to its connection pools unchanged, and they touch it only to
open a TLS connection (to an https origin, or through a proxy to one). At that point it
builds, once, exactly the context httpx would have built with ``verify=True``
(`httpx.create_ssl_context`: the CA file or directory named by SSL_CERT_FILE /
SSL_CERT_DIR, else certifi's bundle; hostnames checked, certificates required) and
forwards every attribute to it. Verification is the same; only its cost, and the reading
of SSL_CERT_FILE / SSL_CERT_DIR, move to the first https request.
"""

from __future__ import annotations

import ssl
import threading

import httpx


class LazyTLS:
    """Stands in for an `ssl.SSLContext`; the real one is made on first use (thread-safe)."""

    def __init__(self, *, trust_env: bool = True) -> None:
        self._trust_env = trust_env
        self._context: ssl.SSLContext | None = None
        self._lock = threading.Lock()

    def context(self) -> ssl.SSLContext:
        if self._context is None:
            with self._lock:
                if self._context is None:
                    self._context = httpx.create_ssl_context(verify=True, trust_env=self._trust_env)
        return self._context

    @property
    def built(self) -> bool:
        return self._context is not None

    def __getattr__(self, name: str):
        # Only attributes not found on LazyTLS itself arrive here: wrap_socket, wrap_bio,
        # set_alpn_protocols, verify_mode... all come from the real context.
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.context(), name)
