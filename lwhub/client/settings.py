"""Client settings from the environment, read when called (never at import).

    LWHUB_URL     the registry, e.g. http://127.0.0.1:8700
    LWHUB_TOKEN   a bearer token (only writes need one)
    LWHUB_CACHE   the cache directory (default: $XDG_CACHE_HOME/lwhub or ~/.cache/lwhub)
"""

from __future__ import annotations

import os
from typing import Any

from .api import Client

DEFAULT_URL = "http://127.0.0.1:8700"


def from_env(**overrides: Any) -> Client:
    """A `Client` configured from LWHUB_URL / LWHUB_TOKEN / LWHUB_CACHE; keyword arguments win."""
    settings: dict[str, Any] = {
        "url": os.environ.get("LWHUB_URL") or DEFAULT_URL,
        "token": os.environ.get("LWHUB_TOKEN") or None,
        "cache_dir": os.environ.get("LWHUB_CACHE") or None,
    }
    settings.update({k: v for k, v in overrides.items() if v is not None or k not in settings})
    url = settings.pop("url")
    return Client(url, **settings)
