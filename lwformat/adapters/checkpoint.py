"""The light checkpoint: a world's adapters and their config in one safetensors file.

Tensors are named ``<slot>.<tensor>``, e.g. ``author/narrate/text/llm:blocks.0.attn.qkv.lora_A``.
The safetensors metadata holds ``format`` (``lwadapters/2``; ``/1`` still loads), ``config`` (the
`LightConfig` as JSON), ``plan`` (the resolved slots) and ``base`` (the digest of
every touched block), so loading refuses adapters made for another base.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..errors import BaseMismatchError, CheckpointError, FusedError, TargetError
from .config import LightConfig, is_explicit
from .inject import customize, decustomize, grad_flags, restore_grad_flags
from .plan import Plan, iter_hosts

if TYPE_CHECKING:
    from ..world.tree import World

FORMAT = "lwadapters/2"
# Written before patterns without wildcards matched dotted suffixes (PEFT's rule) and before keys
# matching nothing were refused: such a file's config is read with its old, exact meaning.
EXACT_NAMES = "lwadapters/1"


def exact_names(config: LightConfig) -> LightConfig:
    """`config` with each pattern without wildcards in the exact full form (``**:name``), the
    meaning it had when lwadapters/1 files were written."""

    def exact(pattern: str) -> str:
        return pattern if ":" in pattern or not is_explicit(pattern) else f"**:{pattern}"

    return msgspec.structs.replace(
        config, slots=[exact(p) for p in config.slots], exclude=[exact(p) for p in config.exclude],
        rank_pattern={exact(k): v for k, v in config.rank_pattern.items()},
        alpha_pattern={exact(k): v for k, v in config.alpha_pattern.items()},
    )  # fmt: skip


def adapter_tensors(world: World) -> dict[str, torch.Tensor]:
    """The live tensors of the world's trainable adapters (its customization), ``<slot>.<tensor>``.

    Bundles applied on top (other names in the hosts' banks) are not part of it.
    """
    if world.customization is None:
        return {}
    name = world.customization[0].name
    return {
        f"{slot}.{tensor}": t
        for slot, host in iter_hosts(world)
        if name in host.adapters
        for tensor, t in host.adapters[name].state_dict(keep_vars=True).items()
    }


def save_adapters(world: World, path: str | os.PathLike) -> None:
    if world.customization is None:
        raise TargetError("the world carries no adapters to save; call customize() first")
    if world.fused_state is not None:  # the base weights hold the deltas: the digests would bind another base
        raise FusedError("cannot save adapters from a fused world; call unfuse() first")
    config, plan = world.customization
    digests = world.digests()
    metadata = {
        "format": FORMAT,
        "config": config.to_json().decode(),
        "plan": msgspec.json.encode(plan, order="sorted").decode(),
        "base": msgspec.json.encode({p: digests[p] for p in plan.blocks()}, order="sorted").decode(),
    }
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent or ".")
    os.close(fd)
    try:
        save_file({k: t.detach().contiguous() for k, t in adapter_tensors(world).items()}, tmp, metadata=metadata)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_adapters(world: World, path: str | os.PathLike) -> Plan:
    """Customize `world` from a light checkpoint; all or nothing."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a mapping)
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path}: unreadable adapter file: {exc}", path=str(path)) from exc
    if meta.get("format") not in (FORMAT, EXACT_NAMES):
        raise CheckpointError(f"{path}: not a light checkpoint (format {meta.get('format')!r})", path=str(path))
    legacy = meta["format"] == EXACT_NAMES
    try:
        config = LightConfig.from_json(meta["config"])
        if legacy:
            config = exact_names(config)
        base = msgspec.json.decode(meta["base"], type=dict[str, str])
    except (KeyError, TargetError, msgspec.DecodeError) as exc:  # TargetError: a config LightConfig refuses
        raise CheckpointError(f"{path}: bad metadata: {exc}", path=str(path)) from exc
    digests = world.digests()
    for block, expected in base.items():
        if digests.get(block) != expected:
            raise BaseMismatchError(
                f"{block}: adapters were made for block digest {expected}, this world has {digests.get(block)}",
                path=block, expected=expected, found=digests.get(block),
            )  # fmt: skip
    grads = grad_flags(world)
    try:
        # Its keys were checked when it was made; one that matches nothing here (a block this
        # world lacks, or a file re-saved from an lwadapters/1 one) changes nothing now either.
        plan = customize(world, config, check_keys=False)
    except TargetError as exc:  # a config the file carries that does not plan on this world
        raise CheckpointError(f"{path}: its config does not fit this world: {exc}", path=str(path)) from exc
    try:
        # The digests checked above are the file's choice: every block the plan adapts must be among them.
        if missing := [b for b in plan.blocks() if b not in base]:
            raise CheckpointError(f"{path}: no base digest for block {missing[0]}, which the adapters adapt", path=missing[0])
        live = adapter_tensors(world)
        if set(live) != set(tensors):
            first = min(set(live) ^ set(tensors))
            raise CheckpointError(f"{path}: tensors do not match the plan (first difference: {first})", path=first)
        with torch.no_grad():
            for key, value in tensors.items():
                if live[key].shape != value.shape:
                    raise CheckpointError(
                        f"{key}: stored shape {tuple(value.shape)}, the plan needs {tuple(live[key].shape)}", path=key
                    )
                # A buffer (a neuron adapter's indices) is what the plan made from the config: one
                # stored otherwise would override the plan silently, or name channels the layer lacks.
                if not isinstance(live[key], torch.nn.Parameter) and not (
                    value.dtype == live[key].dtype and torch.equal(value, live[key])
                ):
                    raise CheckpointError(
                        f"{key}: stored {value.dtype} {value.tolist()}, the plan made {live[key].tolist()} from the config",
                        path=key,
                    )  # fmt: skip
                live[key].copy_(value)
    except BaseException:
        decustomize(world)
        restore_grad_flags(world, grads)
        raise
    return plan

