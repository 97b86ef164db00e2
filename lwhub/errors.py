"""Every error `lwhub` raises derives from one root, `LWHubError`.

    LWHubError
    ├── UsageError (ValueError)               a command line that cannot be carried out as given
    ├── MissingPathError (FileNotFoundError)  a path given on the command line that does not exist
    ├── RegistryError                         the registry refused a request; `.code` is stable
    │   ├── BadRequestError (ValueError)        400  invalid_request, invalid_name, invalid_version,
    │   │   │                                        invalid_digest, invalid_key, digest_mismatch
    │   │   └── MethodNotAllowedError           405  method_not_allowed (the answer's Allow lists the methods)
    │   ├── AuthError (PermissionError)         401  token_missing, token_invalid, token_expired
    │   │   └── ForbiddenError                  403  namespace_forbidden
    │   ├── NotFoundError (LookupError)         404  not_found, bundle_not_found, version_not_found,
    │   │                                            tag_not_found, blob_not_found
    │   ├── ConflictError                       409  version_exists, account_exists
    │   ├── PublishRejectedError (ValueError)   422  manifest_invalid, manifest_mismatch, bundle_invalid,
    │   │                                            blob_missing, blob_mismatch, signature_invalid,
    │   │                                            no_publisher_key
    │   ├── TooLargeError (ValueError)          413  too_large
    │   ├── RangeError (ValueError)             416  range_not_satisfiable
    │   ├── StorageError (OSError)              507  storage_error (disk full, I/O error)
    │   └── ServerError                         500  internal_error, and any code this client
    │                                                does not know
    ├── HubUnavailableError (ConnectionError) no answer: refused, reset, timed out
    ├── ProtocolError (ValueError)            an answer that is not what the API defines
    ├── IntegrityError (ValueError)           downloaded or cached bytes differ from the manifest
    ├── TrustError (PermissionError)          no pinned key for the owner, or a signature that
    │                                         no pinned key made
    ├── RollbackError                         a version older than one already seen
    ├── NotCachedError (FileNotFoundError)    offline, and the cache does not hold the bundle
    ├── CacheError (OSError)                  the local cache could not be written: disk full,
    │                                         read-only, a file-size limit
    ├── PushError (ValueError)                a bundle that cannot be pushed as asked
    └── RefError (ValueError)                 not a reference 'owner/name[@version|@tag]'

`ERROR_CODES` is the one table of the registry's codes: the server answers
``{"error": {"code": ..., "message": ..., "detail": {...}}}`` with the class's HTTP
status, and the client turns that answer back into the same class with `error_for`.
Codes never change meaning; new ones may be added.

Errors from `lwformat` (bundles, signatures, worlds) keep their own types; the command
line maps both families to exit codes in one table (`lwhub.cli`).
"""

from __future__ import annotations

from typing import Any


class LWHubError(Exception):
    """Root of every error raised by `lwhub`."""

    def __init__(self, message: str, *, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class UsageError(LWHubError, ValueError):
    """A command line that cannot be carried out as given (a missing or contradictory argument)."""


class MissingPathError(LWHubError, FileNotFoundError):
    """A path given on the command line that does not exist."""


# -- the registry's answers (lwhub.server; mapped back by lwhub.client.wire) ---------------


class RegistryError(LWHubError):
    """The registry refused a request. `code` is stable and machine-readable; `detail` holds fields."""

    status = 500
    codes: tuple[str, ...] = ()

    def __init__(self, message: str, *, code: str | None = None, detail: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code = code or self.codes[0]
        self.detail = dict(detail or {})


class BadRequestError(RegistryError, ValueError):
    """A malformed name, version, digest, key or body."""

    status = 400
    codes = ("invalid_request", "invalid_name", "invalid_version", "invalid_digest", "invalid_key", "digest_mismatch")


class MethodNotAllowedError(BadRequestError):
    """A method the route does not take; ``detail["allow"]`` lists the ones it does."""

    status = 405
    codes = ("method_not_allowed",)


class AuthError(RegistryError, PermissionError):
    """No token, an unknown token, or an expired one: log in again (`lwhub login`)."""

    status = 401
    codes = ("token_missing", "token_invalid", "token_expired")


class ForbiddenError(AuthError):
    """A valid token whose scopes do not cover the namespace."""

    status = 403
    codes = ("namespace_forbidden",)


class NotFoundError(RegistryError, LookupError):
    """No such bundle, version, tag or blob."""

    status = 404
    codes = ("not_found", "bundle_not_found", "version_not_found", "tag_not_found", "blob_not_found")


class ConflictError(RegistryError):
    """The thing exists already: versions are immutable."""

    status = 409
    codes = ("version_exists", "account_exists")


class PublishRejectedError(RegistryError, ValueError):
    """A publish whose manifest, blobs or signature did not verify; nothing became visible."""

    status = 422
    codes = ("manifest_invalid", "manifest_mismatch", "bundle_invalid", "blob_missing", "blob_mismatch", "signature_invalid",
             "no_publisher_key")  # fmt: skip


class TooLargeError(RegistryError, ValueError):
    status = 413
    codes = ("too_large",)


class RangeError(RegistryError, ValueError):
    status = 416
    codes = ("range_not_satisfiable",)


class StorageError(RegistryError, OSError):
    """The registry could not write: disk full or an I/O error. Nothing was half-written."""

    status = 507
    codes = ("storage_error",)


class ServerError(RegistryError):
    status = 500
    codes = ("internal_error",)


ERROR_CODES: dict[str, type[RegistryError]] = {
    code: cls
    for cls in (BadRequestError, MethodNotAllowedError, AuthError, ForbiddenError, NotFoundError, ConflictError,
                PublishRejectedError, TooLargeError, RangeError, StorageError, ServerError)
    for code in cls.codes
}  # fmt: skip


def error_for(code: str, message: str, detail: dict[str, Any] | None = None) -> RegistryError:
    """The exception for a registry answer; unknown codes become a `ServerError` keeping the code."""
    return ERROR_CODES.get(code, ServerError)(message, code=code, detail=detail)


# -- the hub client's own findings (lwhub.client) ------------------------------------------


class HubUnavailableError(LWHubError, ConnectionError):
    """The registry did not answer (refused, reset, timed out). Check the URL, or pull with offline=True."""

    def __init__(self, message: str, *, url: str) -> None:
        super().__init__(message)
        self.url = url


class ProtocolError(LWHubError, ValueError):
    """The registry answered something the API does not define."""


class IntegrityError(LWHubError, ValueError):
    """Bytes that differ from the signed manifest: `path` names the file, `chunk` the chunk index."""

    def __init__(self, message: str, *, path: str, chunk: int | None = None, expected: str, found: str) -> None:
        super().__init__(message, path=path)
        self.chunk = chunk
        self.expected = expected
        self.found = found


class TrustError(LWHubError, PermissionError):
    """No key is pinned for the owner, or the signature was made by none of the pinned keys."""

    def __init__(self, message: str, *, owner: str) -> None:
        super().__init__(message)
        self.owner = owner


class RollbackError(LWHubError):
    """The registry offered `version` of `name`, older than `seen`, which this client already verified."""

    def __init__(self, message: str, *, name: str, version: str, seen: str) -> None:
        super().__init__(message)
        self.name = name
        self.version = version
        self.seen = seen


class NotCachedError(LWHubError, FileNotFoundError):
    """Offline, and the local cache does not hold what was asked for."""


class CacheError(LWHubError, OSError):
    """The local cache could not be written (disk full, read-only, a file-size limit).
    What was verified before stays; `.path` is the cache's root."""


class PushError(LWHubError, ValueError):
    """A bundle that cannot be pushed as asked (a name or version other than its signed manifest's)."""


class RefError(LWHubError, ValueError):
    """A bundle reference that is not ``owner/name``, ``owner/name@1.2.3`` or ``owner/name@tag``."""
