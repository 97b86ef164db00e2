"""The runtime: apply bundles to a loaded world, stack, weight, swap, fuse, mix per sample."""

from .stack import Applied, apply, remove, set_weight, swap
from .fuse import fuse, unfuse
from .mixed import run

__all__ = ["Applied", "apply", "fuse", "remove", "run", "set_weight", "swap", "unfuse"]
