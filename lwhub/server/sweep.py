"""Sweeping what unfinished pushes leave: blobs no version references, and temp leftovers.

A blob is stale when no version references it and its inode has not changed for
`grace` seconds: not written, and not hard-linked or unlinked (which set its ctime).
A publish links every blob it checks into a staging directory before it commits, so
the blobs of a publish in flight are young and kept; a version committed after the
references were read therefore only has young blobs. A stale blob is renamed into the
temp area first, so no new link to it can be made; if it then has a second link (a
publish staged it between the check and the rename) it is put back, else deleted. A
publish that checked a blob just before it was swept fails cleanly (nothing is
visible), and the next push uploads it again.

Sweeps run at every start (`run.recover`, temp entries of any age) and, while the
registry runs, after an upload at most once every `every` seconds on a background
thread (`Sweeper.maybe`, temp entries older than `grace`): abandoned pushes cannot
fill the disk between restarts, and no request waits for a sweep.
"""

from __future__ import annotations

import logging
import threading
import time

from .blobs import BlobStore
from .store import Store

ORPHAN_GRACE = 3600.0  # seconds an unreferenced blob or temp entry is kept: a push has that long to publish
SWEEP_EVERY = 600.0  # seconds between two sweeps while the registry runs

log = logging.getLogger(__name__)


def sweep(store: Store, blobs: BlobStore, *, grace: float = ORPHAN_GRACE, temp_grace: float | None = None) -> dict[str, int]:
    """Remove stale temp entries (older than `temp_grace`, default `grace`) and stale orphan blobs; return the counts."""
    temp = blobs.clean_temp(older_than=grace if temp_grace is None else temp_grace)
    referenced = store.referenced_blobs()  # read before the blobs are looked at: see the module docstring
    cutoff = time.time() - grace
    unreferenced = [hexdigest for hexdigest, _ in blobs.digests() if f"sha256:{hexdigest}" not in referenced]
    orphans = sum(blobs.remove_if_stale(hexdigest, cutoff) for hexdigest in unreferenced)
    return {"temp": temp, "orphans": orphans}


class Sweeper:
    """Runs `sweep` on a background thread when `maybe` is called, at most once every `every` seconds.

    The first sweep is due `every` seconds after creation (the start has just swept).
    """

    def __init__(self, store: Store, blobs: BlobStore, *, grace: float = ORPHAN_GRACE, every: float = SWEEP_EVERY) -> None:
        self.store, self.blobs, self.grace, self.every = store, blobs, grace, every
        self._due = time.monotonic() + every
        self._lock = threading.Lock()
        self.thread: threading.Thread | None = None
        self.last: dict[str, int] | None = None  # the counts of the last sweep that finished

    def maybe(self) -> bool:
        """Start a sweep if one is due and none is running; True when one started."""
        with self._lock:
            now = time.monotonic()
            if now < self._due or (self.thread is not None and self.thread.is_alive()):
                return False
            self._due = now + self.every
            self.thread = threading.Thread(target=self._run, name="lwhub-sweep", daemon=True)
            self.thread.start()
            return True

    def _run(self) -> None:
        try:
            self.last = sweep(self.store, self.blobs, grace=self.grace)
        except Exception:  # a failed sweep changes nothing a request sees; the next one tries again
            log.exception("sweeping stale uploads failed")
