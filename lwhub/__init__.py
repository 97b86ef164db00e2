"""lwhub: share light custom worlds — the hub server, its client, and the `lwhub` command.

    bundle = lwhub.pull("author/noir-style")     # verified, cached; settings from LWHUB_URL, ...
    world.apply(bundle, weight=0.7)

`Client` is the hub's API (push, pull, search, info, yank, tags, keys); the server lives
in `lwhub.server` and is imported only when asked for.
"""

from .client import Client, pull

__all__ = ["Client", "pull"]
