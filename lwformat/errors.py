"""Every error `lwformat` raises derives from one root, `LWFormatError`.

    LWFormatError
    ├── WorldError                      the world tree, its config or its checkpoint
    │   ├── WorldPathError (KeyError)       no stage, pipeline, graph or block at a path
    │   ├── WorldConfigError (ValueError)   a config that does not describe a world
    │   ├── UnknownBlockError (ValueError)  a block implementation nobody registered
    │   └── CheckpointError (ValueError)    a saved world whose files disagree or changed
    ├── TargetError (ValueError)        customizing: what to inject, where, how big
    │   ├── NothingTargetedError            the selection matched no slot
    │   ├── UnmatchedPatternError           a slots, exclude, rank_pattern or alpha_pattern key matching no slot
    │   ├── UnknownBlockTypeError           a block type no block of the world has
    │   ├── UnsupportedLayerError           a slot whose layer the adapter kind cannot host
    │   ├── RankError                       rank 0, or larger than the layer allows
    │   └── AlreadyCustomizedError          the world already carries adapters
    ├── BundleError                     a bundle: its files, manifest, archive, or fit to a world
    │   ├── BundleNotFoundError (FileNotFoundError)  no bundle at the path
    │   ├── BundleExistsError (FileExistsError)      the target of a write or unpack exists
    │   ├── BundleFormatError (ValueError)  files, manifest or weights header that break the spec
    │   │   └── UnsupportedVersionError         a spec major version this reader does not know
    │   ├── BundleLimitError (ValueError)   a size or count beyond what readers accept
    │   ├── UnsafePathError (ValueError)    a member that could escape, a link, a device
    │   ├── IntegrityError (ValueError)     a file whose size or sha256 differs from the manifest
    │   ├── SlotNotFoundError (KeyError)    a slot the bundle does not hold
    │   ├── IncompatibleError (ValueError)  a bundle that does not fit a world (`check`)
    │   └── SignatureError                  bundle.sig: missing, malformed, untrusted, or not the files
    │       ├── SigningKeyError (ValueError)        a key file that is not an ECDSA PEM key
    │       ├── SigningError (ValueError)           a signature that cannot be made as asked
    │       ├── MissingSignatureError (FileNotFoundError)  no signature (or no bundle directory)
    │       ├── MalformedSignatureError (ValueError)  not a Sigstore bundle over a v1.0 statement
    │       ├── UntrustedSignatureError             verifies with none of the given keys
    │       └── SignedFileMismatchError             a file changed, missing, or not signed
    ├── BaseMismatchError (ValueError)  adapters made for another base: a block digest differs
    ├── InteropError (ValueError)       a PEFT or kohya adapter that cannot be imported or exported
    ├── BlendError (ValueError)         bundles that cannot be blended: kinds, bases or shapes that disagree
    └── RuntimeStateError               applying, swapping, weighting or fusing on a loaded world
        ├── NotAppliedError (KeyError)      no bundle of that name is applied
        ├── AlreadyAppliedError (ValueError) that name is applied already
        ├── LayoutError (ValueError)        a swap that does not fit the applied storage
        ├── WeightError (ValueError)        a weight that is not a finite number the storage can hold
        └── FusedError                      unfuse first / an adapter that cannot be fused

Errors carry the offending location in `.path` (a block path, or a slot written
`block/path:module.path`) so that callers can act on it without parsing messages.
"""

from __future__ import annotations


class LWFormatError(Exception):
    """Root of every error raised by `lwformat`."""

    def __init__(self, message: str, *, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0]) if self.args else ""


class WorldError(LWFormatError):
    """The world tree, its config or its checkpoint is wrong."""


class WorldPathError(WorldError, KeyError):
    """No stage, pipeline, graph or block lives at the given path."""


class WorldConfigError(WorldError, ValueError):
    """A world config that does not describe a valid world."""


class UnknownBlockError(WorldError, ValueError):
    """A config names a block implementation that is not registered."""


class CheckpointError(WorldError, ValueError):
    """A saved world whose files are missing, inconsistent or changed since saving."""


class TargetError(LWFormatError, ValueError):
    """A customization request that cannot be carried out; the world is left unchanged."""


class NothingTargetedError(TargetError):
    """The block types, block globs and slot patterns together matched no slot."""


class UnmatchedPatternError(TargetError):
    """An ``exclude``, ``rank_pattern`` or ``alpha_pattern`` key that matches no selected slot.

    ``path`` names the `LightConfig` field, ``pattern`` the key.
    """

    def __init__(self, message: str, *, path: str, pattern: str) -> None:
        super().__init__(message, path=path)
        self.pattern = pattern


class UnknownBlockTypeError(TargetError):
    """A block type that no block of the world has."""


class UnsupportedLayerError(TargetError):
    """An explicitly listed slot whose layer the chosen adapter kind cannot host."""


class RankError(TargetError):
    """A rank of zero, or one larger than the layer's smaller side allows."""


class AlreadyCustomizedError(TargetError):
    """The world already carries adapters; remove them before customizing again."""


class BaseMismatchError(LWFormatError, ValueError):
    """Adapters made for another base: a touched block's digest differs.

    ``path`` names the block; ``expected`` and ``found`` are its digests.
    """

    def __init__(self, message: str, *, path: str, expected: str, found: str | None) -> None:
        super().__init__(message, path=path)
        self.expected = expected
        self.found = found



# -- bundles (lwformat/bundle/) -----------------------------------------------------------------


class BundleError(LWFormatError):
    """A bundle's files, manifest or archive break the spec, or the bundle does not fit a world.

    ``path`` names the file inside the bundle (``adapters.safetensors``), an archive member,
    the bundle itself, or a block or slot; ``field`` the place inside a file: a JSON path
    into the manifest (``$.slots[2].rank``) or a tensor key of the weights file.
    """

    def __init__(self, message: str, *, path: str | None = None, field: str | None = None) -> None:
        super().__init__(message, path=path)
        self.field = field


class BundleNotFoundError(BundleError, FileNotFoundError):
    """No bundle directory or archive at the given path."""


class BundleExistsError(BundleError, FileExistsError):
    """A write, pack or unpack whose target already exists; nothing is overwritten."""


class BundleFormatError(BundleError, ValueError):
    """Files, manifest or weights header that break spec/lwbundle-v1.md."""


class UnsupportedVersionError(BundleFormatError):
    """A manifest whose spec major version this reader does not implement."""

    def __init__(self, message: str, *, path: str | None = None, found: str, supported: int) -> None:
        super().__init__(message, path=path, field="$.spec")
        self.found = found
        self.supported = supported


class BundleLimitError(BundleError, ValueError):
    """A size or count beyond a reader limit (`lwformat.bundle.limits`), refused before allocating.

    ``limit`` is the constant's name, ``value`` what the input claims, ``maximum`` the bound.
    """

    def __init__(
        self, message: str, *, path: str | None = None, field: str | None = None, limit: str, value: int, maximum: int
    ) -> None:
        super().__init__(message, path=path, field=field)
        self.limit = limit
        self.value = value
        self.maximum = maximum


class UnsafePathError(BundleError, ValueError):
    """A member name that could escape the bundle directory, or a link, device or other non-file."""


class IntegrityError(BundleError, ValueError):
    """A file whose size or sha256 differs from the manifest, or that is missing.

    ``path`` names the file, ``chunk`` the index of the first differing chunk (None when the
    size or the whole-file digest is what differs); ``expected``/``found`` are hex digests or sizes.
    """

    def __init__(
        self, message: str, *, path: str, chunk: int | None = None, expected: str | int | None, found: str | int | None
    ) -> None:
        super().__init__(message, path=path)
        self.chunk = chunk
        self.expected = expected
        self.found = found


class SlotNotFoundError(BundleError, KeyError):
    """A slot (``block/path:module.path``) that the bundle holds no adapter for."""


class IncompatibleError(BundleError, ValueError):
    """A bundle that does not fit a world: ``path`` names the block or slot, ``outcome`` what is wrong."""

    def __init__(self, message: str, *, path: str, outcome: str, expected: str | None = None, found: str | None = None) -> None:
        super().__init__(message, path=path)
        self.outcome = outcome
        self.expected = expected
        self.found = found


# -- signatures and keys (lwformat/bundle/signing.py, keys.py) ---------------------------------


class SignatureError(BundleError):
    """A bundle signature that is missing, malformed, untrusted, or that does not match the files."""


class SigningKeyError(SignatureError, ValueError):
    """A key file that is missing, unreadable, or not an ECDSA P-256/P-384/P-521 PEM key."""


class SigningError(SignatureError, ValueError):
    """A signature that cannot be made as asked: a shard size below 1, an empty file signed by shards."""


class MissingSignatureError(SignatureError, FileNotFoundError):
    """The bundle directory, or its signature file, does not exist."""


class MalformedSignatureError(SignatureError, ValueError):
    """A signature file that is not a Sigstore bundle over a model-signing v1.0 statement."""


class UntrustedSignatureError(SignatureError):
    """The signature verifies with none of the given public keys; ``key_ids`` lists those tried."""

    def __init__(self, message: str, *, path: str, key_ids: list[str]) -> None:
        super().__init__(message, path=path)
        self.key_ids = key_ids


class SignedFileMismatchError(SignatureError):
    """A file that differs from the signed statement, is missing, or is not signed.

    ``path`` names the file; ``expected`` and ``found`` are sha256 hex digests (None when absent).
    """

    def __init__(self, message: str, *, path: str, expected: str | None, found: str | None) -> None:
        super().__init__(message, path=path)
        self.expected = expected
        self.found = found


# -- interop with other adapter formats (lwformat/interop/) -------------------------------------


class InteropError(LWFormatError, ValueError):
    """A PEFT or kohya adapter that cannot be imported or exported; ``path`` names the key or module."""


class RuntimeStateError(LWFormatError):
    """Applying, swapping, weighting or fusing bundles on a loaded world went wrong."""


class NotAppliedError(RuntimeStateError, KeyError):
    """No bundle of that name is applied to the world."""


class AlreadyAppliedError(RuntimeStateError, ValueError):
    """A bundle of that name is applied already; swap it, or apply under another name."""


class LayoutError(RuntimeStateError, ValueError):
    """A swap whose bundle does not fit the applied storage (other slots, kinds, or a larger rank)."""


class WeightError(RuntimeStateError, ValueError):
    """A weight (or a bundle's scaling) that is not a finite number the adapters' dtype can hold; ``path`` names the bundle, glob or slot."""


class FusedError(RuntimeStateError):
    """The world is fused: unfuse before changing its adapters, or cannot fuse this adapter."""


# -- blending bundles (lwformat/runtime/blend.py) -----------------------------------------------


class BlendError(LWFormatError, ValueError):
    """Bundles that cannot be blended, or a blend request that makes no sense.

    ``path`` names the slot (``block/path:module.path``) or block where the parents disagree
    or no blending maths exists (DoRA, mixed kinds); ``parents`` names the bundles involved.
    """

    def __init__(self, message: str, *, path: str | None = None, parents: tuple[str, ...] = ()) -> None:
        super().__init__(message, path=path)
        self.parents = parents
