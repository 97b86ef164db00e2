"""lwhub: share light custom worlds — the hub server, its client, and the `lwhub` command.

    bundle = lwhub.pull("author/noir-style")     # verified, cached; settings as the `lwhub` command's:
    world.apply(bundle, weight=0.7)              # LWHUB_URL, ..., else the `lwhub login` one

`from_env()` is the `Client` those settings make; `Client(url)` takes them as arguments.

`Client` is the hub's API (push, pull, search, info, yank, tags, keys); the server lives
in `lwhub.server` and is imported only when asked for.
"""

# One distribution, one version; importing lwformat's top level imports no torch.
from lwformat import __version__ as __version__

from .client import Client, from_env, pull

__all__ = ["Client", "from_env", "pull"]
