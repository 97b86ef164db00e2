"""The OpenAPI 3.1 document of the registry API, served at ``/openapi.json``.

Built from one table of operations and the msgspec types of `lwhub.protocol`, whose
JSON Schemas msgspec generates; the error codes come from `lwhub.errors.ERROR_CODES`.
"""

from __future__ import annotations

import functools
import re

import msgspec

from ..errors import ERROR_CODES
from ..protocol import (
    DIGEST,
    OWNER,
    TAG,
    BlobInfo,
    BundleInfo,
    KeyInfo,
    NewToken,
    Page,
    PublishRequest,
    SignedVersion,
    TagRequest,
    TokenRequest,
    VersionInfo,
    Whoami,
    YankRequest,
)
from ..semver import PATTERN as SEMVER

BUNDLE = "/v1/bundles/{owner}/{name}"
# (method, path, summary, needs a token, request body type, response type)
OPERATIONS: list[tuple[str, str, str, bool, type | None, object]] = [
    ("get", "/openapi.json", "This document", False, None, dict),
    ("get", "/v1/health", "Liveness and API version", False, None, dict),
    ("get", "/v1/whoami", "The account and scopes of the token", True, None, Whoami),
    ("post", "/v1/tokens", "Issue a token with the same or narrower scopes", True, TokenRequest, NewToken),
    ("get", "/v1/owners/{owner}/keys", "The owner's registered publisher public keys", False, None, Page[KeyInfo]),
    ("post", "/v1/owners/{owner}/keys", "Register a publisher public key (body {\"pem\": ...})", True, dict, KeyInfo),
    ("get", "/v1/blobs/{digest}", "A blob by digest; single Range requests answer 206", False, None, bytes),
    ("head", "/v1/blobs/{digest}", "Whether a blob exists, and its size", False, None, None),
    ("put", "/v1/blobs/{digest}", "Upload a blob; its bytes must hash to the digest", True, bytes, BlobInfo),
    ("get", "/v1/bundles", "Search bundles by substring of name, description or tags (?q=, ?page=, ?limit=)", False, None, Page[BundleInfo]),
    ("get", BUNDLE, "A bundle: description, tags, what latest resolves to", False, None, BundleInfo),
    ("get", BUNDLE + "/versions", "Versions, newest first (?page=, ?limit=)", False, None, Page[VersionInfo]),
    ("get", BUNDLE + "/versions/{version}", "One version", False, None, VersionInfo),
    ("post", BUNDLE + "/versions/{version}", "Publish: verified, then visible atomically", True, PublishRequest, VersionInfo),
    ("post", BUNDLE + "/versions/{version}/yank", "Yank or un-yank a version", True, YankRequest, VersionInfo),
    ("get", BUNDLE + "/resolve/{ref}", "Resolve a version or a tag (latest by default rules)", False, None, VersionInfo),
    ("get", BUNDLE + "/resolve/{ref}/signed", "Resolve, with the manifest and signature inline: what a pull needs before its downloads", False, None, SignedVersion),
    ("put", BUNDLE + "/tags/{tag}", "Point a tag at a version", True, TagRequest, dict),
]


def _bare(pattern: re.Pattern) -> str:
    return pattern.pattern.removeprefix("^").removesuffix("\\Z")  # JSON Schema patterns are ECMA: no \Z


# The server's own patterns for path parameters, so a client knows what passes before asking.
PATTERNS = {
    "owner": f"^{_bare(OWNER)}$", "name": f"^{_bare(OWNER)}$", "digest": f"^{_bare(DIGEST)}$", "tag": f"^{_bare(TAG)}$",
    # `version` is a ref too: GET .../versions/{version} resolves tags (publish takes semver only)
    "version": f"^(?:{_bare(SEMVER)}|{_bare(TAG)})$", "ref": f"^(?:{_bare(SEMVER)}|{_bare(TAG)})$",
}  # fmt: skip

CREATED = {  # the operations that answer 201
    ("post", "/v1/tokens"): "always",
    ("post", "/v1/owners/{owner}/keys"): "always",
    ("put", "/v1/blobs/{digest}"): "when new",
    ("post", BUNDLE + "/versions/{version}"): "when new",
}


def _schema(kind: object, refs: dict[str, dict]) -> dict:
    if kind is bytes:
        return {"type": "string", "format": "binary"}
    (schema,), components = msgspec.json.schema_components([kind], ref_template="#/components/schemas/{name}")
    refs.update(components)
    return schema


def _operation(method: str, path: str, summary: str, token: bool, body: object, result: object, refs: dict) -> dict:
    op: dict = {"summary": summary, "operationId": f"{method}_{re.sub(r'[^a-z]+', '_', path.lower()).strip('_')}"}
    op["parameters"] = [{"name": p, "in": "path", "required": True, "schema": {"type": "string", "pattern": PATTERNS[p]}}
                        for p in re.findall(r"{(\w+)}", path)]  # fmt: skip
    if token:
        op["security"] = [{"bearer": []}]
    if body is not None:
        media = "application/octet-stream" if body is bytes else "application/json"
        op["requestBody"] = {"required": True, "content": {media: {"schema": _schema(body, refs)}}}
    ok: dict = {"description": "OK"}
    if result is not None:
        media = "application/octet-stream" if result is bytes else "application/json"
        ok["content"] = {media: {"schema": _schema(result, refs)}}
    error = {"description": "An error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    made = CREATED.get((method, path))
    if made == "always":
        op["responses"] = {"201": {**ok, "description": "Created"}, "default": error}
    elif made == "when new":  # 200 when it was there already (the same blob, the same signed bundle)
        op["responses"] = {"200": {**ok, "description": "There already"}, "201": {**ok, "description": "Created"}, "default": error}
    else:
        op["responses"] = {"200": ok, "default": error}
    return op


@functools.cache
def document() -> dict:
    refs: dict[str, dict] = {}
    paths: dict[str, dict] = {}
    for method, path, *rest in OPERATIONS:
        paths.setdefault(path, {})[method] = _operation(method, path, *rest, refs)
    codes = sorted(ERROR_CODES)
    refs["Error"] = {
        "type": "object",
        "required": ["error"],
        "properties": {"error": {"type": "object", "required": ["code", "message"], "properties": {
            "code": {"type": "string", "enum": codes},
            "message": {"type": "string"},
            "detail": {"type": "object"},
        }}},
        "description": "Stable codes and their HTTP status: " + ", ".join(f"{c} ({ERROR_CODES[c].status})" for c in codes),
    }  # fmt: skip
    return {
        "openapi": "3.1.0",
        "info": {"title": "lwhub registry", "version": "1"},
        "paths": paths,
        "components": {"schemas": refs, "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }
