"""Push: check the signed bundle locally, upload the blobs the registry lacks, then publish.

    1. open the bundle (the spec's structure checks) and re-hash its files' chunks
    2. the bundle must be signed, and named as asked (name and version are inside the
       signed manifest: renaming means writing and signing again)
    3. for the manifest, the signature and every file: HEAD /v1/blobs/<digest>, and
       PUT the bytes only when missing (the registry hashes them as they arrive)
    4. POST /v1/bundles/<owner>/<name>/versions/<version> {manifest, signature}: the
       registry verifies everything again and makes the version visible atomically
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from lwformat.bundle.manifest import MANIFEST, SIGNATURE
from lwformat.bundle.read import Bundle
from lwformat.bundle.verify import verify_files

from ..errors import PushError
from ..protocol import API, PublishRequest, VersionInfo

if TYPE_CHECKING:
    from .api import Client

PIECE = 1 << 20


def _file_digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _read(path: Path, progress: Callable[[int], None]) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while piece := f.read(PIECE):
            progress(len(piece))
            yield piece


def push(client: Client, bundle_dir: str | Path, name: str | None = None, version: str | None = None,
         *, progress: Callable[[int], None] | None = None) -> VersionInfo:  # fmt: skip
    progress = progress or (lambda n: None)
    with Bundle.open(bundle_dir) as bundle:
        m = bundle.manifest
        if (name or m.name, version or m.version) != (m.name, m.version):
            raise PushError(
                f"{bundle_dir}: the signed manifest names {m.name}@{m.version}, not {name or m.name}@{version or m.version}; "
                "write the bundle under the new name or version and sign it again", path=str(bundle_dir),
            )  # fmt: skip
        if not bundle.signed:
            raise PushError(f"{bundle_dir}: the bundle is not signed; sign it first (`lwhub sign {bundle_dir} --key KEY.pem`)", path=str(bundle_dir))
        verify_files(bundle, whole=False)  # the chunks cover every byte; the registry checks each file's sha256 on upload
        root = bundle.path
        uploads = [(_file_digest(root / MANIFEST), root / MANIFEST), (_file_digest(root / SIGNATURE), root / SIGNATURE)]
        uploads += [(f.sha256, root / f.path) for f in m.files]
        for hexdigest, path in uploads:
            if not client.has_blob(hexdigest):
                client.put_blob(hexdigest, _read(path, progress), path.stat().st_size)
            else:
                progress(path.stat().st_size)
        request = PublishRequest(manifest=f"sha256:{uploads[0][0]}", signature=f"sha256:{uploads[1][0]}")
        owner, _, short = m.name.partition("/")
        return client.post(f"{API}/bundles/{owner}/{short}/versions/{m.version}", request, VersionInfo)
