"""The command line's saved login, and the hub client each online verb talks through.

    $LWHUB_HOME/config.json    (else $XDG_CONFIG_HOME/lwhub/config.json, else ~/.config/lwhub/config.json)
    {"token": "lwh_...", "url": "http://127.0.0.1:8700"}     mode 0600: it holds a secret

`lwhub login` writes it after the hub has accepted the token. Everything is read when
a command runs, never at import. Each setting comes from the first of: the command's
flag, the environment (LWHUB_URL, LWHUB_TOKEN, LWHUB_CACHE), this file, the default
(`lwhub.client.settings.resolve`, which `lwhub.from_env` follows too).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from .client.settings import ENVIRONMENT, config_path, resolve, trust_dir


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


def hub_client(args: argparse.Namespace, **overrides: Any):
    """A `lwhub.client.Client` for this command (use it in a ``with``); keyword settings win over flags."""
    from .client.api import Client

    chosen, withheld = resolve(**{key: overrides.pop(key, None) or getattr(args, key, None) for key in ENVIRONMENT})
    if withheld and not overrides.get("offline"):  # requests will go out without the login: say why
        print(f"lwhub: note: the saved login is for {withheld}, not sent to {chosen['url']} "
              f"(`lwhub login --url {chosen['url']}` saves one for it)", file=sys.stderr)  # fmt: skip
    overrides.setdefault("trust", trust_dir())  # the command's own store, never one a cache holds
    return Client(chosen.pop("url"), **chosen, **overrides)
