"""Re-name a bundle: the same adapters under another ``owner/name`` or version.

Name and version live inside the manifest, and the manifest is one of the signed files,
so a renamed bundle is a new bundle: new manifest bytes, hence a new manifest identity,
and no signature until it is signed again (`signing.sign_bundle`).

    renamed(manifest bytes, name, version) -> canonical manifest bytes   pure
    write_renamed(source dir, new dir, name, version) -> Manifest        the file shell

Only the two fields change: the rest of the JSON value, fields this reader does not know
included (a newer minor version's), is kept as it was, and the result is validated again.

The shell never touches the source: it builds the copy in a temporary sibling of the
target (weights hard-linked where the file system allows, else copied; each opened without
following links and refused unless a regular file, as readers refuse it), without the old
``bundle.sig``, and renames it into place, so a reader sees a whole bundle or none.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..errors import BundleNotFoundError
from .canonical import encode, loads, parse, typed
from .files import list_members, new_directory, open_member, read_member, write_synced
from .limits import MAX_MANIFEST_BYTES
from .manifest import MANIFEST, Manifest


def renamed(manifest_bytes: bytes, *, name: str | None = None, version: str | None = None) -> bytes:
    """The canonical bytes of the manifest under the new name and/or version (validated)."""
    loads(manifest_bytes)  # the input must be a manifest this reader accepts
    changes = {k: v for k, v in (("name", name), ("version", version)) if v is not None}
    value = parse(manifest_bytes, path=MANIFEST) | changes
    typed(value)  # refuses a name or version the spec does not allow
    return encode(value, path=MANIFEST)


def _link_or_copy(root: Path, name: str, target: Path) -> None:
    """``root/name`` as `target`: a link or a non-regular file is refused, as readers refuse it."""
    with open_member(root, name) as f:
        opened = os.fstat(f.fileno())
        try:
            # bundle files are never changed in place: sharing the inode is safe and free
            os.link(root / name, target, follow_symlinks=False)
        except OSError:  # another file system, or one without hard links: copy
            pass
        else:
            linked = os.stat(target, follow_symlinks=False)
            if (linked.st_dev, linked.st_ino) == (opened.st_dev, opened.st_ino):
                return
            target.unlink()  # the name was swapped since it was opened: copy the file that was checked
        with open(target, "xb") as out:
            shutil.copyfileobj(f, out)
            out.flush()
            os.fsync(out.fileno())


def write_renamed(source_dir: str | os.PathLike, out_dir: str | os.PathLike, *, name: str | None = None,
                  version: str | None = None) -> Manifest:  # fmt: skip
    """Write a renamed, unsigned copy of the bundle directory `source_dir` as the new directory `out_dir`."""
    source, target = Path(source_dir), Path(out_dir)
    if not source.is_dir():
        raise BundleNotFoundError(f"{source}: no bundle directory here", path=str(source))
    list_members(source)  # links, devices, FIFOs refused before any is opened (a FIFO would block the open)
    data = renamed(read_member(source, MANIFEST, MAX_MANIFEST_BYTES, "MAX_MANIFEST_BYTES"), name=name, version=version)
    manifest = loads(data)
    with new_directory(target) as tmp:
        for entry in manifest.files:
            _link_or_copy(source, entry.path, tmp / entry.path)
        write_synced(tmp / MANIFEST, data)
    return manifest
