"""The command line's saved login, and the hub client each online verb talks through.

    $LWHUB_HOME/config.json    (else $XDG_CONFIG_HOME/lwhub/config.json, else ~/.config/lwhub/config.json)
    {"token": "lwh_...", "url": "http://127.0.0.1:8700"}     mode 0600: it holds a secret

`lwhub login` writes it after the hub has accepted the token. Everything is read when
a command runs, never at import. Each setting comes from the first of: the command's
flag, the environment (LWHUB_URL, LWHUB_TOKEN, LWHUB_CACHE), this file, the default.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from .errors import UsageError

ENVIRONMENT = {"url": "LWHUB_URL", "token": "LWHUB_TOKEN", "cache_dir": "LWHUB_CACHE"}


def config_path() -> Path:
    from .client.settings import config_home

    return config_home() / "config.json"


def load_config() -> dict[str, Any]:
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


def save_config(settings: dict[str, Any]) -> Path:
    """Write the settings atomically, readable by their owner only (0600 from the first byte)."""
    path = config_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".config.", suffix=".tmp")  # mkstemp creates it 0600
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(settings, f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def settings(args: argparse.Namespace, **overrides: Any) -> tuple[dict[str, Any], str | None]:
    """The client settings for this command: keyword overrides, the flag, the environment,
    then the saved login; and the saved registry's URL when its token was withheld.

    The saved token belongs to the saved registry: a command pointed at another one (by
    ``--url`` or LWHUB_URL) goes without it, so a login never reaches a second hub.
    """
    saved, chosen, from_file = load_config(), {}, set()
    for key, env in ENVIRONMENT.items():
        flag = getattr(args, key, None)
        if flag:
            chosen[key] = flag
        elif not os.environ.get(env) and saved.get(key):
            chosen[key] = saved[key]
            from_file.add(key)
    given = {k: v for k, v in overrides.items() if v is not None}
    chosen |= given
    from_file -= given.keys()
    if "token" in from_file and not _same_hub(chosen.get("url") or os.environ.get("LWHUB_URL"), saved.get("url")):
        del chosen["token"]
        return chosen, saved.get("url")
    return chosen, None


def _same_hub(a: str | None, b: str | None) -> bool:
    from .client.settings import DEFAULT_URL

    return (a or DEFAULT_URL).rstrip("/") == (b or DEFAULT_URL).rstrip("/")


def hub_client(args: argparse.Namespace, **overrides: Any):
    """A `lwhub.client.Client` for this command (use it in a ``with``); keyword settings win."""
    from .client import from_env

    chosen, withheld = settings(args, **overrides)
    if withheld and not chosen.get("offline"):  # requests will go out without the login: say why
        target = chosen.get("url") or os.environ.get("LWHUB_URL")
        print(f"lwhub: note: the saved login is for {withheld}, not sent to {target} "
              f"(`lwhub login --url {target}` saves one for it)", file=sys.stderr)  # fmt: skip
    return from_env(**chosen)
