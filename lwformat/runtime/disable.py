"""Running the base alone for a while, as PEFT's ``disable_adapter()``.

Inside `disabled`, every adapter host of the world returns its base layer's output: the
customization being trained and every applied bundle are left out, their weights, storage
and gradients untouched. Training code compares against the base this way (a reference
pass, a KL term) without a second copy of the world.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from ..adapters.plan import iter_hosts
from ..errors import FusedError

if TYPE_CHECKING:
    from ..world.tree import World


@contextmanager
def disabled(world: World) -> Iterator[None]:
    """Within the block, the world computes as its base; blocks nest.

    Hosts made inside it (an `apply`, a `customize`) start disabled too, and every host is
    enabled again when the outermost block ends, however it ends. A fused world holds its
    adapters in the base weights, so it is refused (unfuse first), and so is `fuse` inside.
    Entering and leaving change a plain attribute of each host: a compiled world compiles
    once more for each state, then reuses both.
    """
    if world.fused_state is not None:
        raise FusedError("a fused world holds its adapters in the base weights: unfuse() first to run the base alone")
    world.adapters_disabled += 1
    try:
        _set(world, True)
        yield
    finally:
        world.adapters_disabled -= 1
        if not world.adapters_disabled:
            _set(world, False)


def _set(world: World, off: bool) -> None:
    for _, host in iter_hosts(world):
        host.__dict__["disabled"] = off  # a plain attribute, as the host keeps `fused`
