"""`lwhub` verbs that talk to a hub: publisher keys, trust, push, pull, and the registry's reads.

    lwhub key register KEY.pub [--owner O]      register a publisher public key with an owner
    lwhub key list OWNER                        the keys the hub lists for OWNER
    lwhub trust add OWNER KEY.pub | list [OWNER] | remove OWNER KEYID    keys pinned on this machine
    lwhub push DIR [--as OWNER/NAME] [--version V] [--key PRIVATE.pem]   (re)sign if needed, publish
    lwhub pull REF [--offline] [--tofu] [--allow-rollback]              prints the cached directory
    lwhub search [QUERY] | info OWNER/NAME | yank REF [--reason R] [--undo] | tag OWNER/NAME TAG VERSION

Push: name and version are inside the signed manifest, so ``--as``/``--version`` that
differ from it push a renamed copy (`lwformat.bundle.rename`), written to a temporary
directory and signed with ``--key``; an unsigned DIR with ``--key`` is signed in place first.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from itertools import islice
from pathlib import Path

import msgspec

from .cli import QUIET, URL, arg, emit, existing, field, group, table, verb
from .cli_config import hub_client
from .cli_progress import Progress
from .errors import MissingPathError, UsageError

group("key", "publisher public keys registered with the hub, per owner")
group("trust", "publisher keys pinned on this machine, per owner: pulls accept only signatures they made")
def _count(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return int(text)


LIMIT = arg("--limit", type=_count, default=50, help="show at most this many (default: 50)")


def _date(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(t))


def _show_bar(args: argparse.Namespace) -> bool:
    return not args.quiet and sys.stderr.isatty()


def pull_ref(client, args: argparse.Namespace, ref: str, *, tofu: bool = False, allow_rollback: bool = False) -> Path:
    """`Client.pull` with a progress bar (its total costs one more small request, so only when drawn)."""
    total = client.resolve(ref).size if _show_bar(args) and not client.offline else None
    with Progress(f"pull {ref}", total, enabled=not args.quiet) as bar:
        return client.pull(ref, tofu=tofu, allow_rollback=allow_rollback, progress=bar)


def push_dir(client, args: argparse.Namespace, folder: Path, label: str):
    total = sum(f.stat().st_size for f in folder.iterdir())
    with Progress(f"push {label}", total, enabled=not args.quiet) as bar:
        return client.push(folder, progress=bar)


def check_target(name: str | None, version: str | None) -> None:
    """Refuse a bad ``--as`` or ``--version`` before any work, as a usage error."""
    from .protocol import OWNER
    from .semver import is_valid

    owner, _, short = (name or "").partition("/")
    if name is not None and not (OWNER.match(owner) and OWNER.match(short)):
        raise UsageError(f"--as {name}: a name is owner/name (lowercase letters, digits, '_', '.', '-')")
    if version is not None and not is_valid(version):
        raise UsageError(f"--version {version}: a version is semver, e.g. 1.2.3 or 1.2.3-rc.1")


def pushed_text(info) -> str:
    yanked = f"\nyanked   {field(info.yank_reason) or 'yes'} (published before, then yanked: `lwhub yank REF --undo` restores it)" if info.yanked else ""
    return f"pushed {field(info.name)}@{field(info.version)}\nmanifest {field(info.manifest)}\nkey id   {field(info.key_id)}{yanked}"


# -- keys and trust ----------------------------------------------------------------------------


@verb("key register", "register a publisher public key with an owner on the hub",
      arg("public", metavar="KEY.pub"), arg("--owner", help="default: the logged-in account"), URL)  # fmt: skip
def key_register(args: argparse.Namespace) -> int:
    public = existing(args.public, "key file")
    with hub_client(args) as client:
        owner = args.owner or client.whoami().account
        info = client.register_key(owner, public)
    emit(args, f"registered key {info.key_id} for {owner}", {"owner": owner} | msgspec.to_builtins(info))
    return 0


@verb("key list", "the publisher keys the hub lists for OWNER", arg("owner", metavar="OWNER"), URL)
def key_list(args: argparse.Namespace) -> int:
    with hub_client(args) as client:
        keys = client.keys(args.owner)
    text = table(["key id", "registered"], [[field(k.key_id), _date(k.created)] for k in keys]) if keys else f"no keys for {args.owner}"
    emit(args, text, {"owner": args.owner, "keys": [msgspec.to_builtins(k) for k in keys]})
    return 0


@verb("trust add", "pin OWNER's publisher key on this machine",
      arg("owner", metavar="OWNER"), arg("public", metavar="KEY.pub"))  # fmt: skip
def trust_add(args: argparse.Namespace) -> int:
    with hub_client(args, offline=True) as client:
        kid = client.trust.pin(args.owner, existing(args.public, "key file"))
    emit(args, f"pinned key {kid} for {args.owner}", {"owner": args.owner, "key_id": kid})
    return 0


@verb("trust list", "the keys pinned on this machine (for OWNER, or for every owner)",
      arg("owner", metavar="OWNER", nargs="?"))  # fmt: skip
def trust_list(args: argparse.Namespace) -> int:
    with hub_client(args, offline=True) as client:
        owners = [args.owner] if args.owner else client.trust.owners()
        pinned = {owner: client.trust.key_ids(owner) for owner in owners}
    rows = [[owner, kid] for owner, kids in pinned.items() for kid in kids]
    emit(args, table(["owner", "key id"], rows) if rows else "no keys pinned", {"pinned": pinned})
    return 0


@verb("trust remove", "unpin one of OWNER's keys", arg("owner", metavar="OWNER"), arg("key_id", metavar="KEYID"))
def trust_remove(args: argparse.Namespace) -> int:
    with hub_client(args, offline=True) as client:
        if not client.trust.unpin(args.owner, args.key_id):
            why = f"no key {args.key_id} is pinned for {args.owner} (`lwhub trust list {args.owner}` shows them)"
            raise MissingPathError(why, path=str(client.trust.root / args.owner))
    emit(args, f"unpinned key {args.key_id} for {args.owner}", {"owner": args.owner, "key_id": args.key_id})
    return 0


# -- publish and fetch -------------------------------------------------------------------------


@verb(
    "push", "publish a bundle (signing it first when asked); prints name@version and the manifest id",
    arg("dir", metavar="DIR", help="a bundle directory or .lwb archive"),
    arg("--as", dest="name", metavar="OWNER/NAME", help="publish under this name (a renamed, re-signed copy)"),
    arg("--version", help="publish as this version (a renamed, re-signed copy)"),
    arg("--key", metavar="PRIVATE.pem", help="sign with this key: needed to rename, or for an unsigned DIR"),
    URL, QUIET,
)  # fmt: skip
def push(args: argparse.Namespace) -> int:
    from lwformat.bundle.keys import load_private_key
    from lwformat.bundle.read import Bundle
    from lwformat.bundle.rename import write_renamed
    from lwformat.bundle.signing import sign_bundle
    from lwformat.bundle.verify import verify_files

    check_target(args.name, args.version)
    key = load_private_key(existing(args.key, "key file")) if args.key else None
    with (Bundle.open(existing(args.dir, "bundle")) as bundle, tempfile.TemporaryDirectory(prefix="lwhub-push-") as tmp,
          hub_client(args) as client):  # fmt: skip
        m = bundle.manifest
        name, version = args.name or m.name, args.version or m.version
        folder = bundle.path
        if (name, version) != (m.name, m.version):
            if key is None:
                raise UsageError(f"{m.name}@{m.version} -> {name}@{version}: the name and version are signed, so the "
                                 "renamed copy must be signed again: give --key PRIVATE.pem")  # fmt: skip
            folder = Path(tmp) / name.replace("/", "-")
            write_renamed(bundle.path, folder, name=name, version=version)
            sign_bundle(folder, key)
        elif not bundle.signed and key is not None:
            verify_files(bundle)  # never sign files that do not match their manifest
            sign_bundle(folder, key)
        info = push_dir(client, args, folder, f"{name}@{version}")
    emit(args, pushed_text(info), msgspec.to_builtins(info))
    return 0


@verb(
    "pull", "verified download into the local cache; prints the bundle directory",
    arg("ref", metavar="REF", help="owner/name (latest), owner/name@1.2.3 or owner/name@tag"),
    arg("--offline", action="store_true", help="serve from the cache only; never connect"),
    arg("--tofu", action="store_true", help="no key pinned for the owner: pin the hub's keys (trust on first use)"),
    arg("--allow-rollback", action="store_true", help="accept a version older than one already pulled here"),
    URL, QUIET,
)  # fmt: skip
def pull(args: argparse.Namespace) -> int:
    from lwformat.bundle.read import Bundle

    with hub_client(args, offline=args.offline) as client:
        path = pull_ref(client, args, args.ref, tofu=args.tofu, allow_rollback=args.allow_rollback)
    with Bundle.open(path) as bundle:
        m, mid = bundle.manifest, bundle.manifest_id
    emit(args, str(path), {"path": str(path), "name": m.name, "version": m.version, "manifest": f"sha256:{mid}"})
    return 0


# -- the registry's reads and edits ------------------------------------------------------------


@verb("search", "bundles whose name, description or tags contain QUERY",
      arg("query", metavar="QUERY", nargs="?", default="", help="default: everything"), LIMIT, URL)  # fmt: skip
def search(args: argparse.Namespace) -> int:
    with hub_client(args) as client:
        found = list(islice(client.search(args.query), args.limit))
    rows = [[field(b.name), field(b.latest or "-"), b.versions, field(",".join(b.tags)), field(b.description[:60])] for b in found]
    text = table(["name", "latest", "versions", "tags", "description"], rows) if rows else f"nothing matches {args.query!r}"
    emit(args, text, {"query": args.query, "bundles": [msgspec.to_builtins(b) for b in found]})
    return 0


@verb("info", "a bundle's versions, tags and yanked versions", arg("name", metavar="OWNER/NAME"), LIMIT, URL)
def info(args: argparse.Namespace) -> int:
    with hub_client(args) as client:
        bundle, versions = client.info(args.name), list(islice(client.versions(args.name), args.limit))
    tags = field(", ".join(f"{t} -> {v}" for t, v in bundle.named_tags.items())) or "none"
    rows = [[field(v.version), _date(v.created), f"{v.size:,}", field(v.key_id[:16]), field(",".join(v.tags)),
             f"yanked{': ' + field(v.yank_reason) if v.yank_reason else ''}" if v.yanked else ""] for v in versions]  # fmt: skip
    text = "\n".join([f"{field(bundle.name)}  {field(bundle.description)}".rstrip(), f"latest  {field(bundle.latest or '-')}", f"tags    {tags}",
                      "", table(["version", "published", "bytes", "key", "tags", ""], rows)])  # fmt: skip
    emit(args, text, {"bundle": msgspec.to_builtins(bundle), "versions": [msgspec.to_builtins(v) for v in versions]})
    return 0


@verb(
    "yank", "mark a version yanked: 'latest' skips it, an exact pull still works; --undo restores it",
    arg("ref", metavar="OWNER/NAME@VERSION"), arg("--reason", default="", help="why, for the people who pulled it"),
    arg("--undo", action="store_true", help="un-yank"), URL,
)  # fmt: skip
def yank(args: argparse.Namespace) -> int:
    from .client import parse_ref
    from .semver import is_valid

    if not is_valid(parse_ref(args.ref)[2]):
        raise UsageError(f"{args.ref}: yank an exact version, owner/name@1.2.3")
    with hub_client(args) as client:
        v = client.yank(args.ref, reason=args.reason, undo=args.undo)
    reason = f": {field(v.yank_reason)}" if v.yank_reason else ""
    text = f"yanked {field(v.name)}@{field(v.version)}{reason}" if v.yanked else f"restored {field(v.name)}@{field(v.version)}"
    emit(args, text, msgspec.to_builtins(v))
    return 0


@verb("tag", "point TAG of a bundle at VERSION",
      arg("name", metavar="OWNER/NAME"), arg("tag", metavar="TAG"), arg("version", metavar="VERSION"), URL)  # fmt: skip
def tag(args: argparse.Namespace) -> int:
    from .protocol import TAG
    from .semver import is_valid

    if args.tag == "latest":  # the hub refuses it too, but its answer reads like a naming rule
        raise UsageError("'latest' is not a tag to set: it always names the highest release not yanked "
                         "(`lwhub yank` a version to move it back); tag VERSION under another name")  # fmt: skip
    if not TAG.match(args.tag):
        raise UsageError(f"tag {args.tag!r}: a tag starts with a letter (lowercase letters, digits, '_', '.', '-'), so "
                         "it is never read as a version")  # fmt: skip
    if not is_valid(args.version):
        raise UsageError(f"{args.version!r}: VERSION is an exact version, e.g. 1.2.3 (`lwhub info {args.name}` lists them)")
    with hub_client(args) as client:
        client.set_tag(args.name, args.tag, args.version)
    emit(args, f"{args.name}@{args.tag} -> {args.version}", {"name": args.name, "tag": args.tag, "version": args.version})
    return 0
