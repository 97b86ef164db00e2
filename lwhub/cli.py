"""The `lwhub` command: one command for the whole project, one small function per verb.

Bundles on this machine (here):

    lwhub keygen [--out DIR] [--name NAME] [--register]  a P-256 key pair: NAME.pem (0600), NAME.pub;
                                                      --register: its public half, with the owner on the hub
    lwhub sign DIR --key PRIVATE.pem                  check DIR's hashes, then write DIR/bundle.sig
    lwhub verify BUNDLE [--key PUBLIC.pem ...]        hashes, then the signature against the given keys,
                                                      else against the keys pinned for the bundle's owner
    lwhub inspect BUNDLE                              name, version, base, blocks, slots, files, signature
    lwhub check BUNDLE --world WORLD_DIR [--strict] [--verify]   does the bundle fit a saved world, block
                                                      by block? (--verify: recompute the world's digests first)
    lwhub --version                                   the package's version

The hub: `cli_admin` (serve, account create, token create, login, whoami), `cli_hub` (key,
trust, push, pull, search, info, yank, tag), `cli_blend` (blend); settings: `cli_config`.
The verbs only wrap the API (`lwhub.client`, `lwhub.server`, `lwformat`).

BUNDLE is a bundle directory or a ``.lwb`` archive. Every verb takes ``--json``: one JSON
document on stdout, an error included (``{"error": {...}}``, with the registry's ``code``
when the hub refused; arguments refused as usage errors too). ``serve --json`` prints
``{"data": ..., "url": ...}`` once it listens (``--port 0``: a free port, named there). Transfers draw a progress bar on a terminal's stderr (``--quiet``: none).

Exit codes, by error class; the first row that matches wins:

    code  meaning               raised as
    0     success
    1     verification failed   IntegrityError (lwformat's, lwhub's), SignatureError, TrustError,
                                PublishRejectedError, RollbackError: a file or download changed,
                                the bundle is unsigned, no trusted key signed it, the hub refused
                                to publish it, or the hub offers an older version than seen here
    2     usage                 bad arguments, UsageError, PushError, RefError, BadRequestError,
                                SigningKeyError (an unusable key file), SigningError (a signature
                                that cannot be made as asked), BundleExistsError (an output
                                directory that exists: bundles are never overwritten)
    3     incompatible          IncompatibleError, BaseMismatchError, BlendError; `check` finding problems
    4     not found             FileNotFoundError, NotFoundError: BundleNotFoundError, MissingPathError,
                                NotCachedError, no such bundle, version or tag on the hub
    5     format                any other LWFormatError: a malformed bundle, world or adapter
    6     hub                   any other LWHubError: StorageError, ServerError, ProtocolError
    7     i/o                   CacheError and any other OSError: permissions, a full disk
    8     not allowed           AuthError, ForbiddenError: no token, a bad or expired one, or one
                                whose scopes do not cover the namespace
    9     exists                ConflictError: that version (or account) exists; versions are immutable
    10    unreachable           HubUnavailableError: nothing answered at the hub's URL
    70    internal error        anything else: a bug; the traceback is printed
    130   interrupted           Ctrl-C
    141   output closed         the reader of a pipe stopped early (``lwhub inspect B | head``)

To add a verb, write ``def name(args) -> int`` decorated with ``@verb("name", "help", arg(...))``;
a verb named ``"trust add"`` is ``add`` under the group ``trust`` (``group("trust", "help")``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lwformat.errors import (
    BaseMismatchError,
    BlendError,
    BundleExistsError,
    CheckpointError,
    IncompatibleError,
    IntegrityError,
    LWFormatError,
    SignatureError,
    SigningError,
    SigningKeyError,
)

from .errors import (
    AuthError,
    BadRequestError,
    CacheError,
    ConflictError,
    ForbiddenError,
    HubUnavailableError,
    LWHubError,
    MethodNotAllowedError,
    MissingPathError,
    NotCachedError,
    NotFoundError,
    PublishRejectedError,
    PushError,
    RefError,
    RegistryError,
    RollbackError,
    StorageError,
    TrustError,
    UsageError,
)
from .errors import IntegrityError as DownloadIntegrityError

BASE_HINT = "this bundle was made for another base world; `lwhub inspect` shows the base it needs"
EXIT_CODES: list[tuple[type[BaseException], int, str]] = [  # (error class, exit code, what to do)
    (SigningKeyError, 2, "give a usable PEM key: `lwhub keygen` makes a new pair under a name no file has yet; openssl-made keys work too"),
    (SigningError, 2, "sign by files (the default), or give a --shard-size of at least 1 and below 2**62"),
    (SignatureError, 1, "do not use this bundle: fetch it again, or ask its author for the right public key"),
    (IntegrityError, 1, "do not use this bundle: a file changed since it was written; fetch it again"),
    (DownloadIntegrityError, 1, "nothing unverified was kept: pull again; if it persists, the hub holds bad bytes"),
    (TrustError, 1, "pin the publisher's key (`lwhub trust add OWNER KEY.pub`); --tofu trusts the hub's keys for an owner with none pinned"),
    (PublishRejectedError, 1, ("nothing was published: `lwhub verify DIR --key KEY.pub` checks the bundle, and "
                               "`lwhub key register KEY.pub` registers its key with the hub")),
    (RollbackError, 1, "pull an explicit version (owner/name@1.2.3), or pass --allow-rollback if you expect the older one"),
    (IncompatibleError, 3, BASE_HINT),
    (BaseMismatchError, 3, BASE_HINT),
    (BlendError, 3, "--method is linear, svd, ties or dare, and the parents must agree on every block they share"),
    (ForbiddenError, 8, "use a token scoped to that namespace: an admin makes one on the hub's machine with `lwhub token create ACCOUNT --data HUB_DIR --scope OWNER`"),
    (AuthError, 8, "log in with a valid token: `lwhub login --token lwh_...` (`lwhub token create` makes one)"),
    (ConflictError, 9, "it exists already on the hub"),
    (HubUnavailableError, 10, ("is the hub running? check --url, LWHUB_URL or `lwhub login --url`; `lwhub pull --offline` "
                               "serves what is cached")),
    (UsageError, 2, "see `lwhub <verb> --help`"),
    (BundleExistsError, 2, "bundles are never overwritten: give --out a directory that does not exist yet, or move the old one away"),
    (PushError, 2, "see `lwhub push --help`"),
    (RefError, 2, "name a bundle as owner/name, owner/name@1.2.3 or owner/name@tag"),
    (MethodNotAllowedError, 2, "the registry does not take that request here: is this lwhub as new as the registry?"),
    (BadRequestError, 2, "the hub refused the request as given: the message says what to change"),
    (NotCachedError, 4, "pull it once online (without --offline) first"),
    (NotFoundError, 4, "`lwhub search WORD` finds names; `lwhub info OWNER/NAME` lists versions and tags"),
    (FileNotFoundError, 4, "check the path"),
    (CheckpointError, 5, "the saved world is incomplete or changed since `World.save` wrote it: save it again from a copy you trust"),
    (LWFormatError, 5, "this is not a valid bundle, world or adapter; was it written by a compatible tool?"),
    (CacheError, 7, "free space for the cache, or point LWHUB_CACHE elsewhere; a pull again keeps the chunks verified so far"),
    (StorageError, 6, "the hub could not store it (its disk is full or failing) and published nothing; try again later"),
    (LWHubError, 6, "see the message above"),
    (OSError, 7, "check permissions and free disk space"),
]  # fmt: skip
# The registry's codes whose advice is finer than their class's (a conflict may be a version
# or an account; a bad request, a name, a version or a key).
CODE_HINTS: dict[str, str] = {
    "version_exists": "versions are immutable: publish under a new --version",
    "account_exists": "account names are taken once: pick another one",
    "invalid_name": "names are owner/name and tags start with a letter (lowercase letters, digits, '_', '.', '-')",
    "invalid_version": "versions are semver: 1.2.3, or 1.2.3-rc.1 for a pre-release",
    "invalid_key": "give an ECDSA P-256 public key in PEM (`lwhub keygen` makes a pair)",
    "digest_mismatch": "the bytes changed on the way to the hub: push again",
    "bundle_not_found": "`lwhub search WORD` finds names",
    "version_not_found": "`lwhub info OWNER/NAME` lists the versions and tags",
    "tag_not_found": "`lwhub info OWNER/NAME` lists the versions and tags",
    "token_expired": "ask for a new token (`lwhub token create`), then `lwhub login --token lwh_...`",
}  # fmt: skip
USAGE, INTERNAL, INTERRUPTED, PIPE_CLOSED, INCOMPATIBLE = 2, 70, 130, 141, 3


def exit_code(exc: BaseException) -> tuple[int, str]:
    """The exit code by the error's class (the first row of `EXIT_CODES` that matches), and what
    to do: the registry code's own hint when `CODE_HINTS` has one, else the class's."""
    code, hint = next(((code, hint) for cls, code, hint in EXIT_CODES if isinstance(exc, cls)), (INTERNAL, ""))
    if isinstance(exc, RegistryError):
        hint = CODE_HINTS.get(exc.code, hint)
    return code, hint


# -- the verb table -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Verb:
    name: str
    help: str
    arguments: tuple[tuple[tuple[str, ...], dict[str, Any]], ...]
    run: Callable[[argparse.Namespace], int]


VERBS: dict[str, Verb] = {}
GROUPS: dict[str, str] = {}  # "trust" -> help, for verbs named "trust add", "trust list", ...


def arg(*flags: str, **options: Any) -> tuple[tuple[str, ...], dict[str, Any]]:
    return flags, options


def verb(name: str, help: str, *arguments: tuple[tuple[str, ...], dict[str, Any]]):
    def register(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        VERBS[name] = Verb(name, help, arguments, fn)
        return fn

    return register


def group(name: str, help: str) -> None:
    GROUPS[name] = help


URL = arg("--url", help="the hub (default: LWHUB_URL, then the `lwhub login` one, then http://127.0.0.1:8700)")
QUIET = arg("--quiet", "-q", action="store_true", help="no progress bar")


def emit(args: argparse.Namespace, text: str, data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=True) if args.json else printable(text))


# Control characters (escape sequences could erase lines, retitle the window; a newline
# could add a "signature: verified" line of its own) and bidirectional overrides:
# descriptions, tags, yank reasons and registry messages come from others, so text output
# shows them escaped. Each such value goes through `field`; `printable` is the backstop.
_BIDI = "\u200e\u200f\u202a-\u202e\u2066-\u2069"
_UNPRINTABLE = re.compile(f"[\x00-\x08\x0b-\x1f\x7f-\x9f{_BIDI}]")
_UNPRINTABLE_IN_FIELD = re.compile(f"[\x00-\x1f\x7f-\x9f{_BIDI}]")


def _escaped(m: re.Match) -> str:
    return ascii(m.group())[1:-1]


def printable(text: str) -> str:
    """`text` for a terminal: newlines and tabs kept, other control characters written as escapes."""
    return _UNPRINTABLE.sub(_escaped, text)


def field(text: str) -> str:
    """One value from a publisher or a registry, on one line: every control character escaped."""
    return _UNPRINTABLE_IN_FIELD.sub(_escaped, text)


def table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [headers, *([str(c) for c in row] for row in rows)]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)


def existing(path: str, what: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise MissingPathError(f"{path}: no such {what}", path=path)
    return p


# -- verbs -------------------------------------------------------------------------------------


@verb(
    "keygen", "write a new ECDSA P-256 key pair (PEM files)",
    arg("--out", default=".", help="directory for the files, or a path prefix (default: .)"),
    arg("--name", default="lwhub", help="file name stem when --out is a directory (default: lwhub)"),
    arg("--register", action="store_true", help="register the public key with the owner on the hub, and pin it here"),
    arg("--owner", help="with --register: the owner (default: the logged-in account)"), URL,
)  # fmt: skip
def keygen(args: argparse.Namespace) -> int:
    from lwformat.bundle.keys import generate_keypair, key_id, load_public_key

    from .cli_config import hub_client

    with hub_client(args) if args.register else contextlib.nullcontext() as client:
        owner = _owner_to_register(client, args.owner) if client else None  # before writing files
        private, public = generate_keypair(args.out, name=args.name)
        kid = key_id(load_public_key(public))
        text = f"private key  {private}  (keep it secret)\npublic key   {public}  (share it)\nkey id       {kid}"
        data = {"private": str(private), "public": str(public), "key_id": kid}
        if client:
            try:
                client.register_key(owner, public)
            except HubUnavailableError as exc:  # no answer: the hub may hold the key now, so its private half stays
                raise HubUnavailableError(f"{exc}; the pair is kept, as the hub may have registered it: once it answers, "
                                          f"`lwhub key register {public} --owner {owner}`", url=exc.url) from exc  # fmt: skip
            except KeyboardInterrupt:  # the same: whether the hub took it is unknown
                raise
            except BaseException:  # a pair the hub refused would block a retry under the same name
                private.unlink(missing_ok=True)
                public.unlink(missing_ok=True)
                raise
            client.trust.pin(owner, public)  # your own key: pulls and blends of what you publish verify here
            text += f"\nregistered   for {owner} on {client.url}, and pinned here"
            data |= {"registered": {"owner": owner, "url": client.url}, "pinned": {"owner": owner, "key_id": kid}}
    emit(args, text, data)
    return 0


def _owner_to_register(client, owner: str | None) -> str:
    """The owner a new key is for, once the hub confirmed the login and that its scopes cover that owner."""
    who = client.whoami()
    owner = owner or who.account
    if owner not in who.scopes:  # what the hub would refuse, but only after the files were written
        raise ForbiddenError(f"the token of {who.account!r} may not register keys for {owner!r} (its scopes: "
                             f"{', '.join(who.scopes) or 'none'}); no key was written",
                             code="namespace_forbidden", detail={"namespace": owner, "scopes": list(who.scopes)})  # fmt: skip
    return owner


@verb(
    "sign", "sign a bundle directory in place (writes DIR/bundle.sig)",
    arg("dir", metavar="DIR", help="the bundle directory"),
    arg("--key", required=True, metavar="PRIVATE.pem", help="the private key"),
    arg("--shard-size", type=int, default=None, metavar="BYTES", help="sign shards of this size, not whole files"),
)  # fmt: skip
def sign(args: argparse.Namespace) -> int:
    from lwformat.bundle.keys import key_id, load_private_key
    from lwformat.bundle.read import Bundle
    from lwformat.bundle.signing import sign_bundle
    from lwformat.bundle.verify import verify_files

    if existing(args.dir, "bundle directory").is_file():
        raise UsageError(f"{args.dir}: an archive; sign the bundle directory, then pack it", path=args.dir)
    key = load_private_key(existing(args.key, "key file"))
    with Bundle.open(args.dir) as bundle:  # never sign files that do not match their manifest
        verify_files(bundle)
        m = bundle.manifest
    sig = sign_bundle(args.dir, key, shard_size=args.shard_size)
    kid = key_id(key.public_key())
    emit(args, f"signed {m.name}@{m.version}: {sig}\nkey id {kid}", {"signature": str(sig), "key_id": kid})
    return 0


@verb(
    "verify", "check a bundle's hashes, then its signature (against --key, else the keys pinned for its owner)",
    arg("bundle", metavar="BUNDLE", help="a bundle directory or .lwb archive"),
    arg("--key", action="append", default=[], metavar="PUBLIC.pem",
        help="a trusted public key (repeatable; default: the keys pinned for the bundle's owner, `lwhub trust list`)"),
)  # fmt: skip
def verify(args: argparse.Namespace) -> int:
    from lwformat.bundle.read import Bundle
    from lwformat.bundle.verify import verify as verify_bundle
    from lwformat.bundle.verify import verify_files

    keys = [existing(k, "key file") for k in args.key]
    with Bundle.open(existing(args.bundle, "bundle")) as bundle:
        m, signed = bundle.manifest, bundle.signed
        owner = m.name.partition("/")[0]
        if keys:  # asked for: an unsigned bundle fails
            kid, signature = verify_bundle(bundle, keys), None
        else:
            verify_files(bundle)
            kid, signature = _verify_pinned(bundle, owner) if signed else (None, "none: the bundle is unsigned")
    signature = signature or f"verified, key {kid}"
    text = f"ok  {m.name}@{m.version}: {len(m.files)} file(s) match the manifest\nsignature: {signature}"
    data = {"ok": True, "name": m.name, "version": m.version, "signed": signed, "signature_checked": kid is not None,
            "key_id": kid, "checked_with": ("key" if keys else "pinned") if kid else None}  # fmt: skip
    emit(args, text, data)
    return 0


def _verify_pinned(bundle, owner: str) -> tuple[str | None, str]:
    """A signed bundle's signature against the keys pinned for `owner`, as `lwhub pull` would check it:
    the signer's key id and what to print (None and why, when nothing is pinned)."""
    from lwformat.bundle.signing import verify_signature
    from lwformat.errors import UntrustedSignatureError

    from .client.settings import trust_dir
    from .trust import TrustStore

    store = TrustStore(trust_dir())
    pinned = store.keys(owner)
    if not pinned:
        return None, (f"present, not checked: no key is pinned for {owner} (give --key PUBLIC.pem, or "
                      f"`lwhub trust add {owner} KEY.pub`)")  # fmt: skip
    try:
        kid = verify_signature(bundle.path, pinned)
    except UntrustedSignatureError as exc:
        raise UntrustedSignatureError(f"{exc} (tried the {len(pinned)} key(s) pinned for {owner} in {store.root})",
                                      path=exc.path, key_ids=exc.key_ids) from exc  # fmt: skip
    return kid, f"verified against the pinned key for {owner} (key {kid})"


@verb("inspect", "show what a bundle holds", arg("bundle", metavar="BUNDLE", help="a bundle directory or .lwb archive"))
def inspect(args: argparse.Namespace) -> int:
    import msgspec

    from lwformat.bundle.read import Bundle

    with Bundle.open(existing(args.bundle, "bundle")) as bundle:
        m, signed, mid = bundle.manifest, bundle.signed, bundle.manifest_id
    slots = [
        [s.slot, s.kind, s.layer, s.rank or "-", f"{s.alpha:g}", ",".join(sorted({t.dtype for t in s.tensors.values()})),
         " ".join(f"{n}{tuple(t.shape)}" for n, t in s.tensors.items())]
        for s in m.slots
    ]  # fmt: skip
    lines = [
        f"{m.name}@{m.version}  ({m.spec}, manifest {mid[:16]})",
        *([field(m.description)] if m.description else []),
        f"base root  {m.base.root}",
        "", table(["block", "digest"], [[b, d] for b, d in m.base.blocks.items()]),
        "", table(["slot", "kind", "layer", "rank", "alpha", "dtype", "tensors"], slots),
        "", table(["file", "bytes", "sha256"], [[f.path, f"{f.size:,}", f.sha256] for f in m.files]),
        "", f"signature  {'present (bundle.sig; check it with lwhub verify --key)' if signed else 'none'}",
    ]  # fmt: skip
    emit(args, "\n".join(lines), {"manifest": msgspec.to_builtins(m), "manifest_id": mid, "signed": signed})
    return 0


@verb(
    "check", "does a bundle fit a saved world? (a dry run, nothing changes)",
    arg("bundle", metavar="BUNDLE", help="a bundle directory or .lwb archive"),
    arg("--world", required=True, metavar="WORLD_DIR", help="a world saved with World.save"),
    arg("--strict", action="store_true", help="also require the world's root digest to match"),
    arg("--verify", action="store_true", help="recompute the world's digests from its weights, not trusting its digests.json"),
)  # fmt: skip
def check(args: argparse.Namespace) -> int:
    from lwformat.bundle.check import check as check_bundle
    from lwformat.bundle.read import Bundle
    from lwformat.world import World

    world = World.load(existing(args.world, "world directory"), verify=args.verify)
    with Bundle.open(existing(args.bundle, "bundle")) as bundle:
        report = check_bundle(bundle, world, strict=args.strict, root=True)
    found = [f._asdict() for f in (*report.blocks, *report.slots, report.root)]
    data = {"bundle": report.bundle, "strict": report.strict, "world_verified": args.verify, "ok": report.ok, "findings": found,
            "problems": [f._asdict() for f in report.problems]}  # fmt: skip
    emit(args, str(report), data)
    return 0 if report.ok else INCOMPATIBLE


# -- entry point -------------------------------------------------------------------------------


class _Version(argparse.Action):
    """``lwhub --version``: the package's version (a JSON document under ``--json``), then exit 0."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, nargs=0, help=kwargs.get("help"))

    def __call__(self, parser: argparse.ArgumentParser, *_: Any) -> None:
        from . import __version__

        print(json.dumps({"version": __version__}) if getattr(parser, "json_errors", False) else f"lwhub {__version__}")
        parser.exit()


class _Parser(argparse.ArgumentParser):
    """argparse's, but under ``--json`` a usage error is a JSON document on stdout as well."""

    json_errors = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)  # "--js" would be --json to argparse, not to main's test for it
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        if self.json_errors:
            error = {"type": "UsageError", "message": message, "path": None, "exit_code": USAGE}
            print(json.dumps({"error": error}, indent=2, sort_keys=True))
        super().error(message)  # usage and message on stderr, exit 2


def build_parser(*, json_errors: bool = False) -> argparse.ArgumentParser:
    from . import cli_admin, cli_blend, cli_hub  # noqa: F401 - their verbs join the table

    parser_class = type("Parser", (_Parser,), {"json_errors": json_errors})  # subparsers are made of this class too
    parser = parser_class(
        prog="lwhub", description="Light custom worlds: bundles, signatures and the hub.",
        epilog="exit codes: 0 ok, 1 verification failed, 2 usage, 3 incompatible, 4 not found, 5 format, "
        "6 hub, 7 i/o, 8 not allowed, 9 exists, 10 unreachable, 70 internal error, 130 interrupted (Ctrl-C), "
        "141 output closed",
    )  # fmt: skip
    parser.add_argument("--version", action=_Version, help="print the version (with --json: as JSON) and exit")
    common = parser_class(add_help=False)
    common.add_argument("--json", action="store_true", help="print one JSON document")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    groups: dict[str, Any] = {}
    for v in VERBS.values():
        head, _, leaf = v.name.rpartition(" ")
        if head and head not in groups:
            g = sub.add_parser(head, help=GROUPS[head], description=GROUPS[head])
            groups[head] = g.add_subparsers(dest="action", metavar="ACTION", required=True)
        p = (groups[head] if head else sub).add_parser(leaf, help=v.help, description=v.help, parents=[common])
        for flags, options in v.arguments:
            p.add_argument(*flags, **options)
        p.set_defaults(run=v.run, verb_name=v.name)
    return parser


def report_error(args: argparse.Namespace, exc: BaseException, code: int, hint: str) -> None:
    if getattr(args, "json", False):
        error = {"type": type(exc).__name__, "message": str(exc), "path": getattr(exc, "path", None), "exit_code": code}
        if registry_code := getattr(exc, "code", None):
            error["code"] = registry_code
        print(json.dumps({"error": error}, indent=2, sort_keys=True))
        return
    message = field(str(exc)) if isinstance(exc, RegistryError) else printable(str(exc))  # the registry's words
    print(f"lwhub {args.verb_name}: error: {message}", file=sys.stderr)
    if hint:
        print(printable(f"  hint: {hint.replace('<verb>', args.verb_name)}"), file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    options = argv[: argv.index("--")] if "--" in argv else argv  # after "--", "--json" is a positional
    args = build_parser(json_errors="--json" in options).parse_args(argv)  # exits 2 on bad arguments
    try:
        return args.run(args)
    except KeyboardInterrupt:
        return INTERRUPTED
    except BrokenPipeError:
        return pipe_closed()
    except Exception as exc:  # noqa: BLE001 - the one place errors become exit codes
        code, hint = exit_code(exc)
        try:
            if code == INTERNAL:
                traceback.print_exc()
                hint = "this is a bug in lwhub; please report it with the traceback above"
            report_error(args, exc, code, hint)
        except BrokenPipeError:  # the reader left before the error report too
            return pipe_closed()
        return code


def pipe_closed() -> int:
    sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - so that exiting does not fail to flush again
    return PIPE_CLOSED


if __name__ == "__main__":  # `python -m lwhub.cli`: the verb modules register into `lwhub.cli`, not `__main__`
    from lwhub.cli import main as lwhub_main

    sys.exit(lwhub_main())
