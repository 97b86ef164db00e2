"""Client settings, read when called (never at import): the environment, then the saved login.

    LWHUB_URL     the registry, e.g. http://127.0.0.1:8700
    LWHUB_TOKEN   a bearer token (only writes need one)
    LWHUB_CACHE   the cache directory (default: $XDG_CACHE_HOME/lwhub or ~/.cache/lwhub)
    LWHUB_HOME    settings: the saved login, the pinned publisher keys and the versions seen (``trust/``)
                  (default: $XDG_CONFIG_HOME/lwhub or ~/.config/lwhub)

    $LWHUB_HOME/config.json    the saved login, written by `lwhub login` (mode 0600: it holds a secret)
    {"token": "lwh_...", "url": "http://127.0.0.1:8700"}

Each setting comes from the first of: the caller's keyword (the command's flag), the
environment, the saved login, the default. `resolve` is that rule, for the `lwhub`
command and for `from_env` (so ``lwhub.pull``) alike.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

from ..errors import UsageError
from .api import Client

DEFAULT_URL = "http://127.0.0.1:8700"
ENVIRONMENT = {"url": "LWHUB_URL", "token": "LWHUB_TOKEN", "cache_dir": "LWHUB_CACHE"}


def config_home() -> Path:
    """Where settings live: $LWHUB_HOME, else $XDG_CONFIG_HOME/lwhub, else ~/.config/lwhub."""
    if home := os.environ.get("LWHUB_HOME"):
        return Path(home)
    return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "lwhub"


def trust_dir() -> Path:
    """The trust store every client uses unless given another: pinned keys and versions seen,
    kept with the settings, apart from the cache (clearing the cache never drops a pin nor
    resets rollback protection)."""
    return config_home() / "trust"


def default_trust_root(cache_root: Path) -> Path:
    """The trust store of a `Client` given none: `trust_dir`, unless ``<cache_root>/trust``
    holds a store, where clients kept theirs before. That one stays in use, with a warning:
    dropping it would lose the pins (pulls refused) and the versions seen (rollbacks
    accepted, without a word)."""
    home, legacy = trust_dir(), Path(cache_root) / "trust"
    if not _holds_files(legacy) or _same_dir(legacy, home):
        return home
    warnings.warn(
        f"the trust store in the cache, {legacy}, holds pinned keys or versions seen; this client keeps using it, not "
        f"{home} (where clients given no trust= now keep theirs, with the `lwhub` command's). To keep it, pass "
        f"trust={str(legacy)!r}; to share the command's, move it to {home}, or when that one exists copy its owner "
        f"folders' files into it (pins and seen markers merge file by file), then remove {legacy}",
        UserWarning,
        stacklevel=3,  # the caller's Client(...)
    )  # fmt: skip
    return legacy


def _holds_files(folder: Path) -> bool:
    try:
        return folder.is_dir() and any(folder.iterdir())
    except OSError:  # there but unreadable: kept, so that pulls fail as they did, closed
        return True


def _same_dir(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)  # a link or a mount naming the same store
    except OSError:  # `b` is not there yet
        return False


def config_path() -> Path:
    return config_home() / "config.json"


def load_config() -> dict[str, str]:
    """The saved login (empty when there is none); `UsageError` naming the file when it is unreadable."""
    path = config_path()
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except ValueError as exc:
        raise UsageError(f"{path}: not a JSON settings file ({exc}); delete it and `lwhub login` again", path=str(path)) from None
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise UsageError(f"{path}: not a JSON object of strings; delete it and `lwhub login` again", path=str(path))
    return value


def resolve(**given: str | os.PathLike | None) -> tuple[dict[str, Any], str | None]:
    """``url``, ``token`` and ``cache_dir``, each from the first of: `given` (None or "" is not
    given), the environment, the saved login, the default; and the saved login's URL when its
    token was withheld.

    The saved token belongs to the saved registry: pointed at another one (by a keyword or
    LWHUB_URL), the client goes without it, so a login never reaches a second hub.
    """
    chosen = {key: given.get(key) or os.environ.get(env) or None for key, env in ENVIRONMENT.items()}
    # Read only when needed: a damaged saved login must not stop a client the environment sets up whole.
    saved = load_config() if None in chosen.values() else {}
    from_file = {key for key, value in chosen.items() if value is None and saved.get(key)}
    chosen |= {key: saved[key] for key in from_file}
    chosen["url"] = chosen["url"] or DEFAULT_URL
    if "token" in from_file and not _same_hub(chosen["url"], saved.get("url")):
        chosen["token"] = None
        return chosen, saved.get("url") or DEFAULT_URL
    return chosen, None


def _same_hub(a: str | None, b: str | None) -> bool:
    return str(a or DEFAULT_URL).rstrip("/") == str(b or DEFAULT_URL).rstrip("/")


def from_env(**overrides: Any) -> Client:
    """A `Client` set up as the `lwhub` command is: ``url``, ``token`` and ``cache_dir`` from
    the keyword, else LWHUB_URL / LWHUB_TOKEN / LWHUB_CACHE, else the saved login (`lwhub
    login`), else the default; other keywords go to `Client` as they are.

    Pinned keys and seen versions live in `trust_dir` (``<config home>/trust``) unless
    ``trust=`` is given, as for the command (never in a store the cache holds: see
    `default_trust_root`).
    """
    chosen, _ = resolve(**{key: overrides.pop(key, None) for key in ENVIRONMENT})
    if overrides.get("trust") is None:
        overrides["trust"] = trust_dir()
    return Client(chosen.pop("url"), **chosen, **overrides)
