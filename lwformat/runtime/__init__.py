"""The runtime: apply bundles to a loaded world, stack, weight, swap, fuse, blend, mix per sample."""

from .blend import Blend, BlendReport, SlotReport, blend
from .disable import disabled
from .fuse import fuse, unfuse
from .mixed import routed, run
from .stack import Applied, apply, remove, set_weight, swap

__all__ = [
    "Applied",
    "Blend",
    "BlendReport",
    "SlotReport",
    "apply",
    "blend",
    "disabled",
    "fuse",
    "remove",
    "routed",
    "run",
    "set_weight",
    "swap",
    "unfuse",
]
