"""A new `nn.Module`'s own state, set in one go.

`nn.Module.__init__` sets its seventeen attributes one `object.__setattr__` at a time. An
apply builds three modules per slot (a host, its bank and an adapter), and those calls
were a tenth of its time. `init_module_state` gives a module the very same state: each
attribute a plain `nn.Module()` holds, read off a real one when this file is imported,
with a new empty container of the same type where it holds one. Should a torch release
put anything else there, the real `__init__` runs instead.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

_CONTAINERS = (dict, OrderedDict, set)
_STATE = tuple(
    (name, type(value) if type(value) in _CONTAINERS else None, value) for name, value in vars(nn.Module()).items()
)  # (attribute, container type to make anew or None, value to share)
_PLAIN = all((make is not None and not value) or value is None or type(value) is bool for _, make, value in _STATE)


def init_module_state(module: nn.Module) -> None:
    """What ``nn.Module.__init__(module)`` does, in half the time."""
    if not _PLAIN:
        nn.Module.__init__(module)
        return
    state = module.__dict__
    for name, make, value in _STATE:
        state[name] = make() if make is not None else value


def new_module_dict() -> nn.ModuleDict:
    """An empty `nn.ModuleDict`, as ``nn.ModuleDict()`` makes it."""
    bank = nn.ModuleDict.__new__(nn.ModuleDict)
    init_module_state(bank)
    return bank
