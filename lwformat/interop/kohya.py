"""kohya-style LoRA files (the common format of community LoRAs) -> the adapters of one block.

A kohya file is one safetensors file; each adapted module has a flat stem with no dots,
e.g. ``lora_unet_down_blocks_0_attentions_0_proj_in``, and three keys:

    <stem>.lora_down.weight   (r, in[, *kernel])   ours: lora_A
    <stem>.lora_up.weight     (out, r[, 1, 1])     ours: lora_B
    <stem>.alpha              ()                   alpha; absent means alpha = r

so that ``y = W x + (alpha / r) · up(down(x))``: a LoRA with that rank and alpha.

`key_map` says which stems belong to the block and which module each one names:

- a string is a prefix (``"lora_unet_"``): stems that start with it belong to the block,
  others (another model's, such as ``lora_te_...``) are left for another import. The rest
  of the stem is the module path with dots written as underscores; since module names
  may hold underscores too, it is resolved against the block's actual module paths
  (``down_blocks.0.attentions.0.proj_in`` -> ``down_blocks_0_attentions_0_proj_in``), and
  a stem that two module paths would both produce is refused as ambiguous.
- a callable maps each stem to a module path, or to None to leave that stem out.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..errors import InteropError
from ..runtime.finiteness import nonfinite
from .attach import ForeignSlot, attach, block_slots, check_module, check_rank, read_safetensors, shapes_for, to_ours

if TYPE_CHECKING:
    from ..adapters.plan import Plan
    from ..world.tree import World

KeyMap = str | Callable[[str], "str | None"]
PARTS = {"lora_down.weight": "lora_A", "lora_up.weight": "lora_B", "alpha": "alpha"}


def prefix_rule(prefix: str, module_paths: list[str]) -> Callable[[str], str | None]:
    """The default rule: strip `prefix`, then find the module path whose dots-as-underscores form is the rest."""
    table: dict[str, list[str]] = {}
    for path in module_paths:
        table.setdefault(path.replace(".", "_"), []).append(path)

    def rule(stem: str) -> str | None:
        if not stem.startswith(prefix):
            return None
        candidates = table.get(stem[len(prefix) :], [])
        if len(candidates) > 1:
            raise InteropError(f"{stem}: ambiguous, could be any of {candidates}; pass a key_map callable", path=stem)
        if not candidates:
            raise InteropError(f"{stem}: no module of the block is named like this (after {prefix!r})", path=stem)
        return candidates[0]

    return rule


def import_kohya(
    world: World, block_path: str, file: str | os.PathLike, *, key_map: KeyMap, name: str | None = None
) -> Plan:
    """Customize `world` with the LoRA in kohya `file` on the block at `block_path`; returns the plan."""
    canonical, slots = block_slots(world, block_path)
    all_paths = [n for n, _ in world.block(block_path).module.named_modules() if n]
    rule = prefix_rule(key_map, all_paths) if isinstance(key_map, str) else key_map
    grouped: dict[str, dict[str, tuple[str, object]]] = {}
    stems: dict[str, str] = {}  # module -> the stem that names it
    for key, value in read_safetensors(file).items():
        stem, _, part = key.partition(".")
        module = rule(stem)
        if module is None:
            continue  # another block's
        if part not in PARTS:
            raise InteropError(f"{key}: not a kohya LoRA key (expected {', '.join(PARTS)})", path=key)
        check_module(world, block_path, slots, module, key)
        if stems.setdefault(module, stem) != stem:  # one stem's tensors would silently replace the other's
            raise InteropError(f"{module}: both {stems[module]!r} and {stem!r} map to it; key_map must keep one", path=module)
        if nonfinite([(key, value)]):  # applied, it would turn every output it touches into NaN
            raise InteropError(f"{key}: holds NaN or inf values (a diverged training run?)", path=key)
        grouped.setdefault(module, {})[PARTS[part]] = (key, value)
    foreign = {}
    for module, found in grouped.items():
        geo = slots[module]
        if "lora_A" not in found or "lora_B" not in found:
            raise InteropError(f"{module}: needs both lora_down and lora_up", path=module)
        key, A = found["lora_A"]
        if A.ndim < 2:  # before its shape is read
            raise InteropError(f"{key}: shape {tuple(A.shape)}, not (r, in[, *kernel])", path=key)
        rank = A.shape[0]  # (r, in, ...)
        check_rank(geo, rank, key)
        want = shapes_for("lora", geo, rank)
        tensors = {n: to_ours(n, geo, want[n], t, key) for n, (key, t) in found.items() if n != "alpha"}
        alpha = float(rank)
        if "alpha" in found:
            key, t = found["alpha"]
            if t.numel() != 1:
                raise InteropError(f"{key}: alpha must hold one number, not shape {tuple(t.shape)}", path=key)
            alpha = float(t.reshape(()).item())
        foreign[module] = ForeignSlot(rank, alpha, tensors)
    if not foreign:
        raise InteropError(f"{file}: no key maps to a module of {block_path}", path=str(file))
    return attach(world, canonical, foreign, kind="lora", rslora=False, name=name or "default")
