"""Refusing adapters that hold NaN or inf, before they reach a world.

Applied, one NaN turns every output its adapter touches into NaN. `write_bundle` refuses
to make such a bundle, but another tool may have, so `apply` and `swap` check values.

A sum is NaN or inf whenever an element is, and costs one pass over the bytes; only a sum
that is not finite (which huge finite values also give) is followed by the exact
element-wise check. A weights file that passed is remembered by its identity (its
sha256 in the manifest, and the file's device, inode, size, mtime and ctime), so applying
the same file again costs a `stat`: bundle files are never written in place, and one that
is gets new times (`os.utime` can set the mtime back, not the ctime).

That memory vouches for the file's values only. Stored in a narrower dtype than the
file's (a float64 bundle on a float32 base; a half base stores its adapters in float32,
so nothing narrows there), a finite value may overflow to inf: each
converted tensor's extremes are converted first (`check_fits`), before anything is
written. `check_fits_once` remembers a file that fit, with the dtypes its tensors went
to, as the NaN/inf check does; a `Blend` is checked each time. A tensor stored in its
own dtype costs nothing there.
"""

from __future__ import annotations

import functools
import hashlib
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable
from typing import Any

import torch

from ..bundle.read import Bundle
from ..errors import BundleFormatError, LayoutError

_PASSED: OrderedDict[tuple, None] = OrderedDict()  # identities of weights files whose values passed
_REMEMBERED = 4096


def nonfinite(named: Iterable[tuple[str, torch.Tensor]]) -> str | None:
    """The name of the first floating tensor holding NaN or inf, else None."""
    for name, t in named:
        if t.is_floating_point() and t.numel():
            if t.element_size() == 1:  # float8: torch neither sums nor checks it (rare; a float32 copy)
                t = t.float()
            total = t.sum(dtype=torch.promote_types(t.dtype, torch.float32))  # () half types summed in float32
            if not torch.isfinite(total) and not torch.isfinite(t).all():
                return name
    return None


def file_identity(bundle: Any) -> tuple | None:
    """The identity of a bundle's weights file as it is now; None for a bundle held in memory (a `Blend`)."""
    return bundle.weights_identity() if isinstance(bundle, Bundle) else None


def passed(identity: tuple | None) -> bool:
    return identity is not None and identity in _PASSED


def remember(identity: tuple | None) -> None:
    if identity is not None:
        _PASSED[identity] = None
        if len(_PASSED) > _REMEMBERED:
            _PASSED.popitem(last=False)


def refuse(bundle: Any, where: str | None, outcome: str = "the world is unchanged") -> None:
    if where is not None:
        m = bundle.manifest
        raise BundleFormatError(f"{m.name}@{m.version}: {where} holds NaN or inf values (a diverged training run?); "
                                f"{outcome}", path=where)  # fmt: skip


def check_bundle(bundle: Any, slots) -> None:
    """Refuse `bundle` before any of its adapters is written (a swap): its runs, from the map.

    A `Bundle` whose file passed costs an `fstat`; a `Blend` (tensors in memory) is checked each time.
    """
    if isinstance(bundle, Bundle):
        runs = bundle.packed()  # mapped first, so the identity is that of the mapped bytes
        identity = bundle.weights_identity()
        if not passed(identity) and nonfinite(runs.items()) is not None:  # one sum per dtype run
            refuse(bundle, nonfinite(_slot_tensors(bundle, slots)))  # then tensor by tensor, for the name
        remember(identity)
    else:
        refuse(bundle, nonfinite(_slot_tensors(bundle, slots)))


def _slot_tensors(bundle: Any, slots) -> Iterable[tuple[str, torch.Tensor]]:
    return ((f"{rs.entry.slot}:{n}", t) for rs in slots for n, t in bundle.slot_tensors(rs.entry.slot).items())


def check_storage(bundle: Any, identity: tuple | None, buffers: dict, by_slot: dict, packed: bool) -> None:
    """Refuse what an apply just read into its storage (while the bytes are in the cache).

    `identity` is the file's, taken before the read. Packed buffers are exactly the file's
    runs; otherwise (padded, converted, or a `Blend`) each slot's tensors are checked. A
    file that passed vouches for its own values only: what a conversion would have made
    inf was refused by `check_fits` before the copy.
    """
    if passed(identity):
        return
    if not packed or nonfinite((str(k), b) for k, b in buffers.items()) is not None:
        refuse(bundle, nonfinite((f"{slot}:{n}", t) for slot, ts in by_slot.items() for n, t in ts.items()))
    remember(identity)


@functools.cache
def widens(source: torch.dtype, target: torch.dtype) -> bool:
    """Whether every finite `source` value is finite in `target` (float16 into bfloat16 or float32...)."""
    return source == target or torch.finfo(target).max >= torch.finfo(source).max


def check_fits(bundle: Any, named: Iterable[tuple[str, torch.Tensor, torch.dtype]]) -> None:
    """Refuse a finite value that its storage's dtype cannot hold: converted, it would be inf.

    `named` gives (``slot:tensor``, the bundle's tensor, the storage's dtype). Conversion is
    monotonic, so a tensor fits when its finite extremes do: one pass over it, and only over
    tensors whose dtype narrows. NaN or inf in the bundle itself is left to `check_storage`
    and `check_bundle`, which name it as such.
    """
    for where, t, dtype in _narrowing(named):
        lo, hi = torch.aminmax(t if t.element_size() > 1 else t.float())  # () each; float8 is not reduced
        for extreme in (hi, lo):
            if extreme.isfinite() and not extreme.to(dtype).isfinite():
                m, name = bundle.manifest, str(dtype).removeprefix("torch.")
                raise LayoutError(f"{m.name}@{m.version}: value {extreme.item():g} at {where} overflows {name}, the dtype "
                                  "this world stores that slot's adapters in (its base layer's, float32 on a half layer); the world is unchanged", path=where)  # fmt: skip


def _narrowing(named: Iterable[tuple[str, torch.Tensor, torch.dtype]]) -> Iterable[tuple[str, torch.Tensor, torch.dtype]]:
    """The entries of `named` whose conversion may overflow: floating into a narrower floating dtype."""
    for where, t, dtype in named:
        if t.dtype != dtype and dtype.is_floating_point and t.is_floating_point() and t.numel() and not widens(t.dtype, dtype):
            yield where, t, dtype


def check_fits_once(bundle: Any, named: Callable[[], Iterable[tuple[str, torch.Tensor, torch.dtype]]],
                    scope: Hashable = None) -> None:  # fmt: skip
    """`check_fits` over ``named()``, skipped for a weights file that fit before into the same
    dtypes: a repeated apply or swap of it costs a `stat`. A `Blend` (no file) is checked each time.

    Call it once the bundle is mapped, so that the identity is that of the bytes checked.
    `scope` says which tensors go to which dtype, where the caller knows it without `named`
    (`copy_runs`: each narrowed dtype run and its target; `named` is then not called for a file
    that passed); by default it is the narrowing tensors' names and dtypes, digested, so that
    the same file into other dtypes is checked again.
    """
    identity = file_identity(bundle)
    if identity is None:
        check_fits(bundle, named())
        return
    entries = None
    if scope is None:
        entries = list(_narrowing(named()))  # names and dtypes only: no value is read yet
        if not entries:  # nothing converts narrower: nothing to check or remember
            return
        lines = "\n".join(f"{where} {t.dtype} {dtype}" for where, t, dtype in entries)
        scope = hashlib.sha256(lines.encode()).digest()  # fixed-size, however many slots
    key = (identity, scope)
    if not passed(key):
        check_fits(bundle, named() if entries is None else entries)
        remember(key)
