"""`lwhub blend`: pull bundles from the hub, blend them into a new one, sign it and push it.

    lwhub blend owner/a:0.7 owner/b@1.2.0:0.3 --method svd --rank 16 --as me/noir-rain --key me.pem

Each part is ``REF[:WEIGHT]`` (weight 1 when left out). The blend (`lwformat.runtime.blend`)
records every parent's name, version, weight and manifest identity in the new manifest;
it is written with `Blend.save`, signed with ``--key`` and pushed. ``--out DIR`` keeps the
bundle there (with ``--no-push`` it is kept in ``./NAME-VERSION`` when ``--out`` is not given).
Everything the command line can check (the parts, the key, a new --out) is checked before any pull.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
from pathlib import Path

import msgspec

from .cli import QUIET, URL, arg, emit, existing, verb
from .cli_config import hub_client
from .cli_hub import check_target, pull_ref, push_dir, pushed_text
from .errors import UsageError


def parse_part(text: str) -> tuple[str, float]:
    """``"owner/name[@version]:0.7"`` -> (ref, 0.7); a ref never holds ':', so the last one splits."""
    ref, sep, weight = text.rpartition(":")
    if not sep:
        return text, 1.0
    try:
        return ref, float(weight)
    except ValueError:
        raise UsageError(f"{text!r}: a part is REF[:WEIGHT], e.g. author/noir-style:0.7") from None


def _new_directory(args: argparse.Namespace) -> Path | None:
    """Where the command line puts the bundle, refused before any pull if it cannot be written there;
    None when that is known only after the blend (a temporary directory, or a name derived from the parents)."""
    if args.out:
        out = Path(args.out)
    elif args.no_push and args.name:
        out = Path(f"{args.name.partition('/')[2]}-{args.version}")
    else:
        return None
    if out.exists() or out.is_symlink():
        raise UsageError(f"{out}: already exists; a blend is written to a new directory (give --out another one)", path=str(out))
    if not out.parent.is_dir():
        raise UsageError(f"{out.parent}: no such directory to write the blend in", path=str(out.parent))
    return out


@verb(
    "blend", "pull bundles, blend them into a new bundle that records its parents, sign it and push it",
    arg("parts", nargs="+", metavar="REF[:WEIGHT]", help="e.g. author/noir-style:0.7 author/rain@1.0.0:0.3"),
    arg("--method", default="svd", help="linear (exact), svd (default), ties or dare"),
    arg("--rank", type=int, help="the blend's LoRA rank (svd, ties, dare; default: the largest parent's)"),
    arg("--as", dest="name", metavar="OWNER/NAME", help="the new bundle's name (default: derived from the parts)"),
    arg("--version", default="0.1.0", help="the new bundle's version (default: 0.1.0)"),
    arg("--key", metavar="PRIVATE.pem", help="sign with this key (needed to push)"),
    arg("--out", metavar="DIR", help="keep the new bundle in DIR (a new directory)"),
    arg("--no-push", action="store_true", help="only write the bundle (to --out, default ./NAME-VERSION)"),
    arg("--tofu", action="store_true", help="pin the hub's keys for owners with none pinned (trust on first use)"),
    URL, QUIET,
)  # fmt: skip
def blend(args: argparse.Namespace) -> int:
    from lwformat.bundle.keys import load_private_key
    from lwformat.bundle.read import Bundle
    from lwformat.bundle.signing import sign_bundle
    from lwformat.runtime import blend as blend_bundles

    parts = [parse_part(p) for p in args.parts]
    check_target(args.name, args.version)
    if not args.no_push and not args.key:
        raise UsageError("a pushed bundle must be signed: give --key PRIVATE.pem (or --no-push)")
    key = load_private_key(existing(args.key, "key file")) if args.key else None
    out = _new_directory(args)
    with hub_client(args) as client, contextlib.ExitStack() as stack:
        bundles = [(stack.enter_context(Bundle.open(pull_ref(client, args, ref, tofu=args.tofu))), w) for ref, w in parts]
        result = blend_bundles(bundles, method=args.method, rank=args.rank, name=args.name, version=args.version)
        m = result.manifest
        if out is None and args.no_push:
            out = Path(f"{m.name.partition('/')[2]}-{m.version}")
        elif out is None:
            out = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="lwhub-blend-"))) / m.name.partition("/")[2]
        manifest = result.save(out)
        if key is not None:
            sign_bundle(out, key)
        info = None if args.no_push else push_dir(client, args, out, f"{m.name}@{m.version}")
    parents = ", ".join(f"{p.name}@{p.version} x {p.weight:g}" for p in manifest.parents)
    lines = [f"blended {m.name}@{m.version} from {parents} ({result.report.method}{f', rank {args.rank}' if args.rank else ''})",
             f"reconstruction error {result.report.relative_error:.3e} (relative, Frobenius, over all slots)",
             *(["  lossy: --method linear blends exactly (its rank is the parents' ranks summed)"]
               if result.report.method == "svd" and result.report.relative_error > 0.01 else []),  # ties/dare differ by design
             *([f"saved to {out}" + ("" if key else " (unsigned)")] if args.out or args.no_push else []),
             *([pushed_text(info)] if info else [])]  # fmt: skip
    data = {
        "name": m.name, "version": m.version, "method": result.report.method, "rank": args.rank,
        "relative_error": result.report.relative_error,
        "slots": {s: r.relative_error for s, r in result.report.slots.items()},
        "parents": [msgspec.to_builtins(p) for p in manifest.parents],
        "saved": str(out) if args.out or args.no_push else None, "signed": key is not None,
        "pushed": msgspec.to_builtins(info) if info else None,
    }  # fmt: skip
    emit(args, "\n".join(lines), data)
    return 0
