"""The lwhub registry server: an ASGI app over a metadata store and a content-addressed blob store.

    app.py      the HTTP routes            store.py   metadata (SQLite)
    blobs.py    blobs by sha256            auth.py    accounts and scoped tokens
    publish.py  the publish transaction    run.py     recovery, Granian, `serve`
    openapi.py  the API document          http.py    JSON answers, errors, pages, ranges
    sweep.py    stale uploads removed, at start and now and then while running

Importing this package imports neither Starlette nor Granian; `create_app` does.
"""

from __future__ import annotations

from .auth import create_account, create_token
from .run import RunningServer, recover, run_server, serve


def create_app(data_dir, *, instance: str = "", **settings):
    """The registry's ASGI app on `data_dir` (imports Starlette); `settings`: ``orphan_grace``,
    ``sweep_every`` (seconds, see `sweep`) and ``upload_idle`` (seconds a request body, an upload or JSON, may send nothing)."""
    from .app import create_app as make

    return make(data_dir, instance=instance, **settings)


__all__ = ["RunningServer", "create_account", "create_app", "create_token", "recover", "run_server", "serve"]
