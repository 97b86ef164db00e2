"""The hub client: resolve, verified concurrent resumable pulls, pushes, and the registry's reads.

    api.py       Client               pull.py    the pull steps (trust, rollback, cache)
    download.py  chunk-verified blobs  push.py    upload and publish
    wire.py      answers -> errors     settings.py  LWHUB_URL / LWHUB_TOKEN / LWHUB_CACHE, the saved login
"""

from __future__ import annotations

from typing import Any

from .api import Client, default_cache_dir
from .pull import parse_ref
from .settings import from_env


def pull(ref: str, *, tofu: bool = False, allow_rollback: bool = False, **settings: Any):
    """Pull `ref` with a `from_env` client (keywords, else the environment, else the `lwhub login`
    one) and open the bundle.

    ``lwhub.pull("author/noir-style")`` -> an open `lwformat.bundle.read.Bundle`, ready for
    ``world.apply(bundle, weight=0.7)``.
    """
    from lwformat.bundle.read import Bundle

    with from_env(**settings) as client:
        return Bundle.open(client.pull(ref, tofu=tofu, allow_rollback=allow_rollback))


__all__ = ["Client", "default_cache_dir", "from_env", "parse_ref", "pull"]
