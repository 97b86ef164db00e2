"""Every error `lwformat` raises derives from one root, `LWFormatError`.

    LWFormatError
    ├── WorldError                      the world tree, its config or its checkpoint
    │   ├── WorldPathError (KeyError)       no stage, pipeline, graph or block at a path
    │   ├── WorldConfigError (ValueError)   a config that does not describe a world
    │   ├── UnknownBlockError (ValueError)  a block implementation nobody registered
    │   └── CheckpointError (ValueError)    a saved world whose files disagree or changed
    ├── TargetError (ValueError)        customizing: what to inject, where, how big
    │   ├── NothingTargetedError            the selection matched no slot
    │   ├── UnknownBlockTypeError           a block type no block of the world has
    │   ├── UnsupportedLayerError           a slot whose layer the adapter kind cannot host
    │   ├── RankError                       rank 0, or larger than the layer allows
    │   └── AlreadyCustomizedError          the world already carries adapters
    └── BaseMismatchError (ValueError)  adapters made for another base: a block digest differs

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
