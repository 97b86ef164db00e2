"""The signature file: a Sigstore bundle (v0.3 JSON) holding one DSSE envelope, signed by a key.

    PAE        = "DSSEv1 " len(type) " " type " " len(payload) " " payload      (DSSE v1.0)
                 type = "application/vnd.in-toto+json"
    bundle.sig = compact JSON, no trailing newline:
                 {"mediaType": "application/vnd.dev.sigstore.bundle.v0.3+json",
                  "verificationMaterial": {"publicKey": {"hint": hex sha256(signer's SPKI PEM)},
                                           "tlogEntries": []},
                  "dsseEnvelope": {"payload": base64(payload), "payloadType": type,
                                   "signatures": [{"sig": base64(ECDSA-DER(PAE)), "keyid": ""}]}}
                 ECDSA with SHA-256 on P-256 (SHA-384 on P-384, SHA-512 on P-521), deterministic (RFC 6979)

This is the layout `model_signing sign key` writes. Reading is strict (exact field sets,
canonical base64) so that no changed byte of the file can go unnoticed.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Iterable

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec

from ..errors import MalformedSignatureError, UntrustedSignatureError
from . import keys as K
from .manifest import SIGNATURE

PAYLOAD_TYPE = "application/vnd.in-toto+json"
BUNDLE_MEDIA_TYPE = "application/vnd.dev.sigstore.bundle.v0.3+json"


def pae(payload: bytes, payload_type: str = PAYLOAD_TYPE) -> bytes:
    """DSSE pre-authentication encoding: the bytes the signature actually covers."""
    return b"DSSEv1 %d %s %d %s" % (len(payload_type), payload_type.encode(), len(payload), payload)


def key_hint(key: K.PublicKey) -> str:
    return hashlib.sha256(K.public_pem(key)).hexdigest()


def expect(ok: bool, message: str) -> None:
    if not ok:
        raise MalformedSignatureError(f"{SIGNATURE}: {message}", path=SIGNATURE)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: object, what: str) -> bytes:
    # Canonical base64 only: a decoder that skips junk or ignores padding bits would let a changed byte through.
    try:
        data = base64.b64decode(text, validate=True) if isinstance(text, str) else None
    except (binascii.Error, ValueError):
        data = None
    expect(data is not None and _b64(data) == text, f"{what} is not canonical base64")
    return data  # type: ignore[return-value]


def _exact(obj: object, keys: set[str], where: str) -> dict:
    expect(isinstance(obj, dict) and set(obj) == keys, f"{where} must hold exactly {sorted(keys)}")
    return obj  # type: ignore[return-value]


def sign_envelope(payload: bytes, private_key: K.PrivateKey) -> bytes:
    """The signature file's bytes for `payload`."""
    public = private_key.public_key()
    # RFC 6979: k derives from the key and message, so the same payload always gets the same bytes.
    sig = private_key.sign(pae(payload), ec.ECDSA(K.hash_for(public), deterministic_signing=True))  # DER (r, s)
    bundle = {
        "mediaType": BUNDLE_MEDIA_TYPE,
        "verificationMaterial": {"publicKey": {"hint": key_hint(public)}, "tlogEntries": []},
        "dsseEnvelope": {
            "payload": _b64(payload),
            "payloadType": PAYLOAD_TYPE,
            "signatures": [{"sig": _b64(sig), "keyid": ""}],
        },
    }
    return json.dumps(bundle, separators=(",", ":")).encode()


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    doc = dict(pairs)
    if len(doc) != len(pairs):  # JSON readers disagree on which one counts (Python's: the last)
        raise MalformedSignatureError(f"{SIGNATURE}: a JSON object names a key twice", path=SIGNATURE)
    return doc


def _fields(signature: bytes) -> tuple[str | None, bytes, bytes]:
    """(key hint, payload, DER signature), every field checked."""
    try:  # UTF-8 strictly, no byte order mark: from bytes, Python's json would read UTF-16 and UTF-32 too, which
        # Sigstore's readers (model_signing's) refuse
        doc = json.loads(signature.decode("utf-8"), object_pairs_hook=_unique_keys)
    except (ValueError, RecursionError) as exc:  # bad UTF-8 or JSON, an integer past Python's digit limit; nested too deep
        raise MalformedSignatureError(f"{SIGNATURE}: not JSON ({exc})", path=SIGNATURE) from exc
    doc = _exact(doc, {"mediaType", "verificationMaterial", "dsseEnvelope"}, "the bundle")
    expect(doc["mediaType"] == BUNDLE_MEDIA_TYPE, f"media type {doc['mediaType']!r}, expected {BUNDLE_MEDIA_TYPE}")
    material = doc["verificationMaterial"]
    expect(isinstance(material, dict) and set(material) <= {"publicKey", "tlogEntries"}, "bad verificationMaterial")
    expect(material.get("tlogEntries", []) == [], "transparency-log entries are not supported for key signatures")
    public = material.get("publicKey")
    expect(isinstance(public, dict) and set(public) <= {"hint"}, "publicKey must be there and hold only a hint")
    hint = public.get("hint")
    expect(hint is None or isinstance(hint, str), "the key hint must be a string")
    envelope = _exact(doc["dsseEnvelope"], {"payload", "payloadType", "signatures"}, "dsseEnvelope")
    expect(envelope["payloadType"] == PAYLOAD_TYPE, f"payload type {envelope['payloadType']!r}, not {PAYLOAD_TYPE}")
    sigs = envelope["signatures"]
    expect(isinstance(sigs, list) and len(sigs) == 1, "exactly one signature is expected")
    entry = _exact(sigs[0], {"sig", "keyid"}, "the signature")
    expect(entry["keyid"] == "", "keyid must be empty (the key is named by the hint)")
    return hint, _unb64(envelope["payload"], "the payload"), _unb64(entry["sig"], "the signature")


def open_envelope(signature: bytes, public_keys: Iterable[K.PublicKey]) -> tuple[str, bytes]:
    """(key id of the key that verifies, payload); `UntrustedSignatureError` when none does."""
    hint, payload, sig = _fields(signature)
    tried = []
    for key in public_keys:
        tried.append(K.key_id(key))
        if hint and hint != key_hint(key):
            continue  # the bundle names another key (the stock verifier refuses this too)
        try:
            key.verify(sig, pae(payload), ec.ECDSA(K.hash_for(key)))
        except InvalidSignature:
            continue
        return tried[-1], payload
    raise UntrustedSignatureError(
        f"{SIGNATURE}: the signature matches none of the {len(tried)} given key(s) "
        f"({', '.join(k[:16] for k in tried) or 'none'}); check that you have the signer's public key",
        path=SIGNATURE, key_ids=tried,
    )  # fmt: skip
