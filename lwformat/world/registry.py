"""Registries that let a config name code: block implementations and graph flows.

A block implementation turns a config dict into an ``nn.Module`` and states the block
type it provides (``llm``, ``conditioner``, ``backbone``, ``codec``, ...). A flow is
the function a graph runs: it takes the graph and a dict of named tensors and returns
the tensors it produces. The reference zoo registers its own on import.

A name is registered once: registering a name already taken, by you or by the zoo, raises
WorldConfigError unless ``replace=True`` or it is the same function again (a module
reloaded, a notebook cell run twice: the same module and qualified name). Every registration imports the zoo first, so a
zoo name is taken whether or not a config has named one yet, and the zoo, once imported,
never replaces a registration of yours.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import UnknownBlockError, WorldConfigError

BlockFactory = Callable[..., nn.Module]
Flow = Callable[..., dict]


@dataclass(frozen=True)
class BlockImpl:
    name: str
    type: str
    build: BlockFactory


_BLOCKS: dict[str, BlockImpl] = {}
_FLOWS: dict[str, Flow] = {}
_BUILTINS = ("lwformat.zoo",)


def register_block(name: str, type: str, *, replace: bool = False) -> Callable[[BlockFactory], BlockFactory]:
    """Decorator: make `fn(**config) -> nn.Module` buildable from configs as `name`.

    A name already registered (yours or the zoo's) raises WorldConfigError unless ``replace=True``.
    """

    def decorate(fn: BlockFactory) -> BlockFactory:
        _register(_BLOCKS, "block implementation", name, BlockImpl(name, type, fn), replace, fn)
        return fn

    return decorate


def register_flow(name: str, *, replace: bool = False) -> Callable[[Flow], Flow]:
    """Decorator: make `fn(graph, state) -> dict` usable as the flow `name` of a graph.

    A name already registered (yours or the zoo's) raises WorldConfigError unless ``replace=True``.
    """

    def decorate(fn: Flow) -> Flow:
        _register(_FLOWS, "flow", name, fn, replace, fn)
        return fn

    return decorate


def _register(table: dict[str, Any], kind: str, name: str, entry: Any, replace: bool, fn: Callable) -> None:
    # The zoo first: imported later, on a config naming one of its blocks, it would replace
    # a registration of the same name in the middle of building worlds.
    _load_builtins()
    if name in table and not replace and _origin(table[name]) != _origin(fn):
        raise WorldConfigError(
            f"{name}: a {kind} of that name is registered already; pass replace=True to replace it", path=name
        )
    table[name] = entry


def _origin(entry: Any) -> tuple[str, str] | object:
    """Where a function was defined, if that names it: a lambda, a nested function or a
    partial has no name of its own, and two of them are never taken for the same."""
    fn = entry.build if isinstance(entry, BlockImpl) else entry
    module, name = getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)
    if module is None or name is None or "<" in name:  # <lambda>, <locals>
        return object()  # equal to nothing
    return module, name


def _load_builtins() -> None:
    for module in _BUILTINS:
        importlib.import_module(module)


def block_impl(name: str, *, where: str = "") -> BlockImpl:
    if name not in _BLOCKS:
        _load_builtins()
    try:
        return _BLOCKS[name]
    except KeyError:
        known = ", ".join(sorted(_BLOCKS)) or "none"
        raise UnknownBlockError(
            f"{where or name}: no block implementation named {name!r} (registered: {known})",
            path=where or None,
        ) from None


def flow(name: str, *, where: str = "") -> Flow:
    if name not in _FLOWS:
        _load_builtins()
    try:
        return _FLOWS[name]
    except KeyError:
        known = ", ".join(sorted(_FLOWS))
        raise WorldConfigError(
            f"{where or name}: no flow named {name!r} (registered: {known})", path=where or None
        ) from None


def build_block(name: str, config: dict[str, Any], *, where: str = "") -> tuple[nn.Module, str]:
    impl = block_impl(name, where=where)
    try:
        return impl.build(**config), impl.type
    except (torch.OutOfMemoryError, NotImplementedError):
        raise  # the device's limit, or a backend without the op: not the config's fault
    except (TypeError, ValueError, RuntimeError) as exc:  # unknown keys, bad values, and what torch says of them
        raise WorldConfigError(f"{where}: cannot build block {name!r} from its config: {exc}", path=where) from exc


def sequential(graph, state: dict) -> dict:
    """Feed ``state["x"]`` through the graph's nodes in order."""
    if "x" not in state:  # a bare KeyError('x') from deep inside a world's pass says nothing of the flow
        raise WorldConfigError(
            f"the sequential flow feeds state['x'] through the nodes {list(graph.nodes)}, and the state holds "
            f"{sorted(state)}: pass {{'x': ...}}, or give the graph a flow that reads your keys "
            "(`World.from_blocks(..., flows={'stage/pipeline/graph': name})`, `register_flow`)"
        )
    x = state["x"]
    for block in graph.nodes.values():
        x = block(x)
    return {"x": x}


_FLOWS["sequential"] = sequential  # set directly: register_flow imports the zoo, which imports this module
