"""Client settings from the environment, read when called (never at import).

    LWHUB_URL     the registry, e.g. http://127.0.0.1:8700
    LWHUB_TOKEN   a bearer token (only writes need one)
    LWHUB_CACHE   the cache directory (default: $XDG_CACHE_HOME/lwhub or ~/.cache/lwhub)
    LWHUB_HOME    settings: the saved login, the pinned publisher keys and the versions seen (``trust/``)
                  (default: $XDG_CONFIG_HOME/lwhub or ~/.config/lwhub)
"""

from __future__ import annotations

import os
from typing import Any

from pathlib import Path

from ..trust import TrustStore
from .api import Client

DEFAULT_URL = "http://127.0.0.1:8700"


def config_home() -> Path:
    """Where settings live: $LWHUB_HOME, else $XDG_CONFIG_HOME/lwhub, else ~/.config/lwhub."""
    if home := os.environ.get("LWHUB_HOME"):
        return Path(home)
    return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "lwhub"


def from_env(**overrides: Any) -> Client:
    """A `Client` configured from LWHUB_URL / LWHUB_TOKEN / LWHUB_CACHE; keyword arguments win.

    Pinned keys and seen versions live in ``<config home>/trust`` (security state, kept apart
    from the cache so that clearing the cache never drops a pin nor resets rollback
    protection), unless ``trust=`` is given.
    """
    settings: dict[str, Any] = {
        "url": os.environ.get("LWHUB_URL") or DEFAULT_URL,
        "token": os.environ.get("LWHUB_TOKEN") or None,
        "cache_dir": os.environ.get("LWHUB_CACHE") or None,
    }
    settings.update({k: v for k, v in overrides.items() if v is not None or k not in settings})
    url = settings.pop("url")
    settings.setdefault("trust", None)
    if settings["trust"] is None:
        settings["trust"] = TrustStore(config_home() / "trust")
    return Client(url, **settings)
