"""Generate the signature vectors: python spec/vectors/signed/make_signed.py [OUT]

Every vector is a copy of ../valid-dir with a ``bundle.sig`` (or a change after signing).
The keys in ``test-keys/`` are TEST KEYS, published with the vectors: never trust them for
anything else. They are made once; later runs reuse them, and since signing is
deterministic (RFC 6979) rerunning gives the same bytes, except ``signed-stock``, signed by
the stock ``model_signing`` tool (randomized ECDSA), which is kept once made.
``index.json`` lists each vector, the key to verify it with, and the expected outcome of
`lwformat.bundle.signing.verify_signature` (spec/signature.md, "Verifying").
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))  # run from anywhere, uninstalled

import msgspec  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402

from lwformat.bundle import keys, signing  # noqa: E402
from lwformat.bundle.canonical import dumps, loads  # noqa: E402
from lwformat.bundle.hashing import FileHasher  # noqa: E402

VALID = HERE.parent / "valid-dir"
KEYS = "test-keys"
SIGNER, OTHER = "test-signer", "test-other"
STOCK = "signed-stock"
SHARD = 512


def ok(about: str) -> dict:
    return {"about": about, "expect": {"outcome": "ok"}}


def fails(about: str, error: str, path: str | None = None) -> dict:
    return {"about": about, "expect": {"error": error, **({"path": path} if path else {})}}


def flip(path: Path, position: int) -> None:
    data = bytearray(path.read_bytes())
    data[position] ^= 0x01
    path.write_bytes(bytes(data))


def rehash_manifest(d: Path) -> None:
    """Make the manifest match the (changed) weights again, as an attacker would."""
    manifest = loads((d / "manifest.json").read_bytes())
    hasher = FileHasher(manifest.chunk_size)
    hasher.update((d / "adapters.safetensors").read_bytes())
    files = [hasher.entry(f.path) if f.path == "adapters.safetensors" else f for f in manifest.files]
    (d / "manifest.json").write_bytes(dumps(msgspec.structs.replace(manifest, files=files)))


def resign_statement(d: Path, key: ec.EllipticCurvePrivateKey, edit) -> None:
    """Sign, by `key`, a statement over the directory's real digests, changed by `edit`."""
    statement = json.loads(signing.statement_for(signing.file_digests(d, signing.list_files(d)), model_name=d.name))
    edit(statement)
    (d / "bundle.sig").write_bytes(signing.sign_statement(json.dumps(statement, indent=2).encode(), key))


def edit_bundle(d: Path, edit) -> None:
    doc = json.loads((d / "bundle.sig").read_bytes())
    edit(doc)
    (d / "bundle.sig").write_bytes(json.dumps(doc, separators=(",", ":")).encode())


def make_keys(out: Path) -> None:
    (out / KEYS).mkdir(parents=True, exist_ok=True)
    for name in (SIGNER, OTHER):
        if not (out / KEYS / f"{name}.pem").exists():
            keys.generate_keypair(out / KEYS, name=name)


def stock_sign(d: Path, private: Path) -> None:
    cmd = [sys.executable, "-m", "model_signing", "sign", "key", str(d), "--signature", str(d / "bundle.sig"),
           "--private_key", str(private)]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True)


def main(out: Path = HERE) -> None:
    make_keys(out)
    signer = keys.load_private_key(out / KEYS / f"{SIGNER}.pem")
    other = keys.load_private_key(out / KEYS / f"{OTHER}.pem")
    sig = lambda d: signing.sign_bundle(d, signer)  # noqa: E731
    vectors = {  # name -> (index entry, how to make it from a fresh copy of valid-dir)
        "signed-files": (ok("signed by files, as `lwhub sign` does"), sig),
        "signed-shards": (ok(f"signed by {SHARD}-byte shards"), lambda d: signing.sign_bundle(d, signer, shard_size=SHARD)),
        STOCK: (ok("signed by the stock `model_signing sign key` command"), None),
        "unsigned": (fails("no bundle.sig", "MissingSignatureError"), lambda d: None),
        "tampered-weight": (fails("one weight byte changed after signing", "SignedFileMismatchError", "adapters.safetensors"),
                            lambda d: (sig(d), flip(d / "adapters.safetensors", -3))),
        "tampered-weight-rehashed": (
            fails("a weight byte changed and the manifest rehashed to match: only the signature notices",
                  "SignedFileMismatchError", "adapters.safetensors"),
            lambda d: (sig(d), flip(d / "adapters.safetensors", -3), rehash_manifest(d))),
        "tampered-manifest": (fails("manifest.json changed after signing", "SignedFileMismatchError", "manifest.json"),
                              lambda d: (sig(d), flip(d / "manifest.json", 40))),
        "tampered-signature": (fails("one character of the ECDSA signature changed", "UntrustedSignatureError"),
                               lambda d: (sig(d), edit_bundle(d, _flip_sig))),
        "wrong-key": (fails("signed by another key than the one trusted", "UntrustedSignatureError"),
                      lambda d: signing.sign_bundle(d, other)),
        "extra-file": (fails("a file added after signing", "SignedFileMismatchError", "notes.txt"),
                       lambda d: (sig(d), (d / "notes.txt").write_text("added\n"))),
        "missing-file": (fails("a signed file removed", "SignedFileMismatchError", "adapters.safetensors"),
                         lambda d: (sig(d), (d / "adapters.safetensors").unlink())),
        "statement-other-digest": (
            fails("a valid signature over a statement with another digest for manifest.json",
                  "SignedFileMismatchError", "manifest.json"),
            lambda d: resign_statement(d, signer, lambda s: _set_digest(s, "manifest.json", "0" * 64))),
        "subject-mismatch": (fails("the statement's subject digest is not the root of its resources",
                                   "MalformedSignatureError"),
                             lambda d: resign_statement(d, signer, lambda s: s["subject"][0]["digest"].update(sha256="1" * 64))),
        "unsupported-hash": (fails("hash_type blake3 (sha256 only)", "MalformedSignatureError"),
                             lambda d: resign_statement(d, signer, lambda s: s["predicate"]["serialization"].update(hash_type="blake3"))),
        "bad-media-type": (fails("a Sigstore bundle v0.2 media type", "MalformedSignatureError"),
                           lambda d: (sig(d), edit_bundle(d, lambda b: b.update(mediaType="application/vnd.dev.sigstore.bundle+json;version=0.2")))),
    }  # fmt: skip
    index = []
    for name, (entry, make) in vectors.items():
        d = out / name
        if name == STOCK and d.exists() and make is None:
            pass  # randomized signature: keep the one made first
        else:
            shutil.rmtree(d, ignore_errors=True)
            shutil.copytree(VALID, d)
            if name == STOCK:
                stock_sign(d, out / KEYS / f"{SIGNER}.pem")
            else:
                make(d)
        index.append({"name": name, "path": name, "key": f"{KEYS}/{SIGNER}.pub", **entry})
    about = "TEST KEYS in test-keys/: published with the vectors, never trust them for anything else."
    (out / "index.json").write_text(json.dumps({"format": "lwbundle-signature-vectors/1", "about": about,
                                                "vectors": index}, indent=2) + "\n")  # fmt: skip


def _flip_sig(bundle: dict) -> None:
    entry = bundle["dsseEnvelope"]["signatures"][0]
    raw = bytearray(base64.b64decode(entry["sig"]))
    raw[len(raw) // 2] ^= 0x01  # inside s: still DER, no longer valid
    entry["sig"] = base64.b64encode(bytes(raw)).decode()


def _set_digest(statement: dict, name: str, digest: str) -> None:
    resources = statement["predicate"]["resources"]
    for r in resources:
        if r["name"] == name:
            r["digest"] = digest
    root = signing.root_digest({r["name"]: r["digest"] for r in resources})
    statement["subject"][0]["digest"]["sha256"] = root


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE)
