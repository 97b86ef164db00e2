"""File digests (spec/lwbundle-v1.md, "Files"): the sha256 of a whole file and of each chunk.

    sha256  = hex sha256 of the file's bytes
    chunks  = [hex sha256 of bytes[i*C : (i+1)*C] for i in 0 .. ceil(size / C) - 1],  C = chunk_size

The last chunk is shorter when C does not divide the size; an empty file has no chunks.
Chunks let a download verify and resume piece by piece and hash pieces in parallel.
"""

from __future__ import annotations

import hashlib
from typing import BinaryIO

from .manifest import FileEntry

PIECE = 1 << 20  # bytes read at a time: bounded memory whatever the chunk size


class FileHasher:
    """Feed a file's bytes in pieces of any size; `entry` gives its `FileEntry`.

    With ``whole=False`` only the chunks are hashed (half the work), for a caller that
    knows the file's sha256 already; the entry's ``sha256`` is then empty.
    """

    def __init__(self, chunk_size: int, *, whole: bool = True) -> None:
        self.chunk_size = chunk_size
        self.size = 0
        self.whole = hashlib.sha256() if whole else None
        self.chunks: list[str] = []
        self._chunk = hashlib.sha256()
        self._fill = 0  # bytes in the current chunk

    def update(self, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        if self.whole is not None:
            self.whole.update(view)
        self.size += len(view)
        while len(view):
            take = min(len(view), self.chunk_size - self._fill)
            self._chunk.update(view[:take])
            self._fill += take
            view = view[take:]
            if self._fill == self.chunk_size:
                self.chunks.append(self._chunk.hexdigest())
                self._chunk, self._fill = hashlib.sha256(), 0

    def entry(self, path: str) -> FileEntry:
        chunks = self.chunks + ([self._chunk.hexdigest()] if self._fill else [])
        return FileEntry(path=path, size=self.size, sha256=self.whole.hexdigest() if self.whole else "", chunks=chunks)


def hash_stream(f: BinaryIO, path: str, chunk_size: int, *, whole: bool = True) -> FileEntry:
    hasher = FileHasher(chunk_size, whole=whole)
    while piece := f.read(PIECE):
        hasher.update(piece)
    return hasher.entry(path)
