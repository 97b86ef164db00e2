"""The `lwhub` command: one command for the whole project, one small function per verb.

    lwhub keygen [--out DIR] [--name NAME]            write a P-256 key pair: NAME.pem (0600), NAME.pub
    lwhub sign DIR --key PRIVATE.pem                  check DIR's hashes, then write DIR/bundle.sig
    lwhub verify BUNDLE [--key PUBLIC.pem ...]        hashes, then the signature against any given key
    lwhub inspect BUNDLE                              name, version, base, blocks, slots, files, signature
    lwhub check BUNDLE --world WORLD_DIR [--strict]   does the bundle fit a saved world, block by block?

BUNDLE is a bundle directory or a ``.lwb`` archive. Every verb takes ``--json``: one JSON
document on stdout, an error included (``{"error": {...}}``).

Exit codes, by error class; the first row that matches wins:

    code  meaning               raised as
    0     success
    1     verification failed   IntegrityError, SignatureError: a file changed, the bundle is
                                unsigned, or the signature matches none of the keys
    2     usage                 bad arguments, UsageError, SigningKeyError (an unusable key file),
                                SigningError (a signature that cannot be made as asked)
    3     incompatible          IncompatibleError, BaseMismatchError; `check` finding problems
    4     not found             FileNotFoundError: BundleNotFoundError, MissingPathError, ...
    5     format                any other LWFormatError: a malformed bundle, world or adapter
    6     hub                   any other LWHubError (the online verbs)
    7     i/o                   any other OSError: permissions, a full disk
    70    internal error        anything else: a bug; the traceback is printed
    130   interrupted           Ctrl-C
    141   output closed         the reader of a pipe stopped early (``lwhub inspect B | head``)

To add a verb, write ``def name(args) -> int`` decorated with ``@verb("name", "help", arg(...))``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lwformat.errors import (
    BaseMismatchError,
    IncompatibleError,
    IntegrityError,
    LWFormatError,
    SignatureError,
    SigningError,
    SigningKeyError,
)

from .errors import LWHubError, MissingPathError, UsageError

EXIT_CODES: list[tuple[type[BaseException], int, str]] = [  # (error class, exit code, what to do)
    (SigningKeyError, 2, "give a usable PEM key: `lwhub keygen` makes a new pair; openssl-made keys work too"),
    (SigningError, 2, "sign by files (the default), or give a --shard-size of at least 1"),
    (SignatureError, 1, "do not use this bundle: fetch it again, or ask its author for the right public key"),
    (IntegrityError, 1, "do not use this bundle: a file changed since it was written; fetch it again"),
    (IncompatibleError, 3, "this bundle was made for another base world; `lwhub inspect` shows the base it needs"),
    (BaseMismatchError, 3, "this bundle was made for another base world; `lwhub inspect` shows the base it needs"),
    (UsageError, 2, "see `lwhub <verb> --help`"),
    (FileNotFoundError, 4, "check the path"),
    (LWFormatError, 5, "this is not a valid bundle, world or adapter; was it written by a compatible tool?"),
    (LWHubError, 6, "see the message above"),
    (OSError, 7, "check permissions and free disk space"),
]
INTERNAL, INTERRUPTED, PIPE_CLOSED, INCOMPATIBLE = 70, 130, 141, 3


def exit_code(exc: BaseException) -> tuple[int, str]:
    return next(((code, hint) for cls, code, hint in EXIT_CODES if isinstance(exc, cls)), (INTERNAL, ""))


# -- the verb table -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Verb:
    name: str
    help: str
    arguments: tuple[tuple[tuple[str, ...], dict[str, Any]], ...]
    run: Callable[[argparse.Namespace], int]


VERBS: dict[str, Verb] = {}


def arg(*flags: str, **options: Any) -> tuple[tuple[str, ...], dict[str, Any]]:
    return flags, options


def verb(name: str, help: str, *arguments: tuple[tuple[str, ...], dict[str, Any]]):
    def register(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        VERBS[name] = Verb(name, help, arguments, fn)
        return fn

    return register


def emit(args: argparse.Namespace, text: str, data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=True) if args.json else text)


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
)  # fmt: skip
def keygen(args: argparse.Namespace) -> int:
    from lwformat.bundle.keys import generate_keypair, key_id, load_public_key

    private, public = generate_keypair(args.out, name=args.name)
    kid = key_id(load_public_key(public))
    text = f"private key  {private}  (keep it secret)\npublic key   {public}  (share it)\nkey id       {kid}"
    emit(args, text, {"private": str(private), "public": str(public), "key_id": kid})
    return 0


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
    "verify", "check a bundle's hashes, then its signature against the given public keys",
    arg("bundle", metavar="BUNDLE", help="a bundle directory or .lwb archive"),
    arg("--key", action="append", default=[], metavar="PUBLIC.pem", help="a trusted public key (repeatable)"),
)  # fmt: skip
def verify(args: argparse.Namespace) -> int:
    from lwformat.bundle.read import Bundle
    from lwformat.bundle.verify import verify as verify_bundle

    keys = [existing(k, "key file") for k in args.key]
    with Bundle.open(existing(args.bundle, "bundle")) as bundle:
        kid = verify_bundle(bundle, keys or None)
        m = bundle.manifest
    signature = f"verified, key {kid}" if kid else "not checked (give --key PUBLIC.pem to check it)"
    text = f"ok  {m.name}@{m.version}: {len(m.files)} file(s) match the manifest\nsignature: {signature}"
    data = {"ok": True, "name": m.name, "version": m.version, "signature_checked": kid is not None, "key_id": kid}
    emit(args, text, data)
    return 0


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
        *([m.description] if m.description else []),
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
)  # fmt: skip
def check(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from lwformat.bundle.check import check as check_bundle
    from lwformat.bundle.read import Bundle
    from lwformat.world import World

    world = World.load(existing(args.world, "world directory"))
    with Bundle.open(existing(args.bundle, "bundle")) as bundle:
        report = check_bundle(bundle, world, strict=args.strict)
    found = [asdict(f) for f in (*report.blocks, *report.slots, report.root)]
    data = {"bundle": report.bundle, "strict": report.strict, "ok": report.ok, "findings": found,
            "problems": [asdict(f) for f in report.problems]}  # fmt: skip
    emit(args, str(report), data)
    return 0 if report.ok else INCOMPATIBLE


# -- entry point -------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lwhub", description="Light custom worlds: bundles, signatures and the hub.",
        epilog="exit codes: 0 ok, 1 verification failed, 2 usage, 3 incompatible, 4 not found, 5 format, "
        "6 hub, 7 i/o, 70 internal error",
    )  # fmt: skip
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print one JSON document")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    for v in VERBS.values():
        p = sub.add_parser(v.name, help=v.help, description=v.help, parents=[common])
        for flags, options in v.arguments:
            p.add_argument(*flags, **options)
        p.set_defaults(run=v.run)
    return parser


def report_error(args: argparse.Namespace, exc: BaseException, code: int, hint: str) -> None:
    if getattr(args, "json", False):
        error = {"type": type(exc).__name__, "message": str(exc), "path": getattr(exc, "path", None), "exit_code": code}
        print(json.dumps({"error": error}, indent=2, sort_keys=True))
        return
    print(f"lwhub {args.verb}: error: {exc}", file=sys.stderr)
    if hint:
        print(f"  hint: {hint}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # exits 2 on bad arguments
    try:
        return args.run(args)
    except KeyboardInterrupt:
        return INTERRUPTED
    except BrokenPipeError:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - so that exiting does not fail to flush again
        return PIPE_CLOSED
    except Exception as exc:  # noqa: BLE001 - the one place errors become exit codes
        code, hint = exit_code(exc)
        if code == INTERNAL:
            traceback.print_exc()
            hint = "this is a bug in lwhub; please report it with the traceback above"
        report_error(args, exc, code, hint)
        return code


if __name__ == "__main__":
    sys.exit(main())
