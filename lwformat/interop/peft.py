"""PEFT LoRA/DoRA adapter directories <-> the adapters of one block.

A PEFT adapter directory holds ``adapter_config.json`` and ``adapter_model.safetensors``
with, for each adapted module at dotted path ``m`` of the base model:

    base_model.model.<m>.lora_A.weight        (r, in[, *kernel])    ours: lora_A
    base_model.model.<m>.lora_B.weight        (out, r[, 1, 1])      ours: lora_B
    base_model.model.<m>.lora_embedding_A     (r, num_embeddings)   ours: lora_A  (embeddings)
    base_model.model.<m>.lora_embedding_B     (dim, r)              ours: lora_B  (embeddings)
    base_model.model.<m>.lora_magnitude_vector (out,) | (1, out, 1[, 1])  ours: magnitude (DoRA)

The math is the same on both sides: ``y += s·B(A(x))`` with ``s = alpha/r`` (``alpha/√r``
with ``use_rslora``), DoRA rescaling rows to ``magnitude``. Per-module rank and alpha come
from ``rank_pattern``/``alpha_pattern``, whose keys PEFT matches as the regex
``(.*\\.)?(key)$`` against the module path; the first matching key wins.

The block's module is the base model: module paths are relative to it. Tensors are
copied bit for bit (converted only if the block's dtype differs from the file's).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import uuid
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from ..adapters.kinds import KINDS
from ..adapters.plan import iter_hosts
from ..errors import InteropError
from ..runtime.finiteness import nonfinite
from .attach import (
    ForeignSlot,
    attach,
    block_slots,
    check_module,
    check_rank,
    foreign_shape,
    most_common,
    read_safetensors,
    shapes_for,
    to_ours,
)

if TYPE_CHECKING:
    from ..adapters.plan import Plan
    from ..world.tree import World

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."
SUFFIXES = {  # PEFT key suffix -> (our tensor name, for embeddings?)
    ".lora_A.weight": ("lora_A", False),
    ".lora_B.weight": ("lora_B", False),
    ".lora_embedding_A": ("lora_A", True),
    ".lora_embedding_B": ("lora_B", True),
    ".lora_magnitude_vector": ("magnitude", None),
}
MAX_CONFIG_BYTES = 1 << 20
# Config fields that add tensors we do not hold, change the math, or assume a modified base.
REFUSED = (
    "modules_to_save", "trainable_token_indices", "lora_bias", "target_parameters", "alora_invocation_tokens",
    "use_qalora", "layer_replication", "use_bdlora", "arrow_config", "kasa_config", "velora_config",
    "monteclora_config", "megatron_config",
)  # fmt: skip
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


def _pattern(patterns: dict, module: str, default):
    for key, value in patterns.items():
        try:
            if re.match(rf"(.*\.)?({key})$", module):
                return value
        except re.error as exc:
            raise InteropError(f"{CONFIG}: pattern {key!r} is not a valid regex: {exc}", path=key) from exc
    return default


def read_config(peft_dir: Path) -> dict:
    path = peft_dir / CONFIG
    if not path.is_file():
        raise InteropError(f"{path}: no PEFT adapter config here", path=str(path))
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise InteropError(f"{path}: larger than {MAX_CONFIG_BYTES} bytes", path=str(path))
    try:
        config = json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InteropError(f"{path}: not JSON: {exc}", path=str(path)) from exc
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        found = config.get("peft_type") if isinstance(config, dict) else None
        raise InteropError(f"{path}: peft_type {found!r}; only LORA adapters (LoRA, DoRA) import", path=str(path))
    for field in REFUSED:
        if config.get(field) not in (None, False, [], {}):
            raise InteropError(f"{path}: {field}={config[field]!r} is not supported", path=field)
    if config.get("bias", "none") != "none":
        raise InteropError(f"{path}: bias={config['bias']!r} trains base biases; only bias='none' imports", path="bias")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.startswith(BASE_CHANGING_INITS):
        raise InteropError(f"{path}: init_lora_weights={init!r} changes the base weights", path="init_lora_weights")
    for field in ("rank_pattern", "alpha_pattern"):
        if config.get(field) is not None and not isinstance(config[field], dict):
            raise InteropError(f"{path}: {field}={config[field]!r} is not an object of module patterns", path=field)
    ranks = {"r": config.get("r", 8)}
    ranks |= {f"rank_pattern[{k!r}]": v for k, v in (config.get("rank_pattern") or {}).items()}
    for field, rank in ranks.items():
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise InteropError(f"{path}: {field}={rank!r} is not a positive integer", path=field)
    alphas = {"lora_alpha": config.get("lora_alpha", 8)}
    alphas |= {f"alpha_pattern[{k!r}]": v for k, v in (config.get("alpha_pattern") or {}).items()}
    for field, alpha in alphas.items():
        if not _finite_number(alpha):
            raise InteropError(f"{path}: {field}={alpha!r} is not a finite number", path=field)
    return config


def _finite_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _read_slots(
    world: World, block_path: str, slots: dict, config: dict, tensors: dict, kind: str, root: str = ""
) -> dict[str, ForeignSlot]:
    grouped: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    peft_names: dict[str, str] = {}  # our module path -> PEFT's, which its rank and alpha patterns name
    for key, value in tensors.items():
        suffix = next((s for s in SUFFIXES if key.endswith(s)), None)
        if not key.startswith(PREFIX) or suffix is None:
            raise InteropError(f"{key}: not a PEFT LoRA/DoRA tensor key", path=key)
        peft_name = key[len(PREFIX) : -len(suffix)]
        module = f"{root}.{peft_name}" if root else peft_name
        peft_names[module] = peft_name
        geo = check_module(world, block_path, slots, module, key)
        if nonfinite([(key, value)]):  # applied, it would turn every output it touches into NaN
            raise InteropError(f"{key}: holds NaN or inf values (a diverged training run?)", path=key)
        name, for_embedding = SUFFIXES[suffix]
        if for_embedding is not None and for_embedding != (geo.layer == "embedding"):
            raise InteropError(f"{key}: a {suffix.strip('.')} tensor on a {geo.layer} layer", path=key)
        grouped.setdefault(module, {})[name] = (key, value)
    out = {}
    for module, found in grouped.items():
        geo = slots[module]
        if geo.layer not in KINDS[kind].layers:
            raise InteropError(f"{PREFIX}{module}: {kind} does not support {geo.layer} layers", path=module)
        if "lora_A" not in found:
            raise InteropError(f"{PREFIX}{module}: has no lora_A tensor", path=module)
        key_A, A = found["lora_A"]
        if A.ndim < 2:  # before its shape is read
            raise InteropError(f"{key_A}: shape {tuple(A.shape)}, not (r, in[, *kernel])", path=key_A)
        rank = A.shape[0]  # (r, in, ...)
        if rank != (expected := _pattern(config.get("rank_pattern") or {}, peft_names[module], config.get("r", 8))):
            raise InteropError(f"{key_A}: rank {rank}, the config says {expected}", path=key_A)
        check_rank(geo, rank, key_A)
        want = shapes_for(kind, geo, rank)
        if missing := sorted(set(want) - set(found)) or sorted(set(found) - set(want)):
            raise InteropError(f"{PREFIX}{module}: tensors {missing} missing or unexpected for {kind}", path=module)
        alpha = float(_pattern(config.get("alpha_pattern") or {}, peft_names[module], config.get("lora_alpha", 8)))
        ours = {n: to_ours(n, geo, want[n], t, key) for n, (key, t) in found.items()}
        out[module] = ForeignSlot(rank, alpha, ours)
    return out


def import_peft(world: World, block_path: str, peft_dir: str | os.PathLike, *, name: str | None = None, root: str = "") -> Plan:
    """Customize `world` with a PEFT LoRA/DoRA adapter on the block at `block_path`; returns the plan.

    `root` is the module path, inside the block, of the model the adapter was made for: a block
    wrapping a Hugging Face model as ``.model`` takes adapters made on that model with ``root="model"``.
    """
    peft_dir = Path(peft_dir)
    config = read_config(peft_dir)
    weights = peft_dir / WEIGHTS
    if not weights.is_file():
        pickled = (peft_dir / "adapter_model.bin").exists()
        why = " (adapter_model.bin is a pickle and is never loaded)" if pickled else ""
        raise InteropError(f"{weights}: missing{why}", path=str(weights))
    canonical, slots = block_slots(world, block_path)
    kind = "dora" if config.get("use_dora") else "lora"
    foreign = _read_slots(world, block_path, slots, config, read_safetensors(weights), kind, root)
    return attach(world, canonical, foreign, kind=kind, rslora=bool(config.get("use_rslora")), name=name or "default")


def _suffix(name: str, layer: str) -> str:
    return next(s for s, (n, emb) in SUFFIXES.items() if n == name and emb in (None, layer == "embedding"))


def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def _targets(modules: list[str], all_paths: list[str]) -> list[str] | str:
    # PEFT targets a listed name and every module whose path ends with ".<name>": list only when that is exact.
    targeted = set(modules)
    if any(p.endswith("." + m) and p not in targeted for p in all_paths for m in modules):
        return "^(?:" + "|".join(re.escape(m) for m in modules) + ")$"  # a string is matched in full
    return modules


def export_peft(world: World, block_path: str, out_dir: str | os.PathLike, *, root: str = "") -> Path:
    """Write the block's adapters as a PEFT adapter directory; returns `out_dir`.

    `root` is the module path, inside the block, of the model PEFT will load the adapter on
    (``"model"`` for a block wrapping a Hugging Face model as ``.model``); only adapters under it
    are written, named from it.
    """
    if world.customization is None:
        raise InteropError("the world carries no adapters to export; customize it or import some first")
    canonical, _ = block_slots(world, block_path)
    _, plan = world.customization
    under = f"{root}." if root else ""
    in_block = [s for s in plan.slots if s.block_path == canonical]
    slots = [s for s in in_block if s.module_path.startswith(under)]
    if not slots:
        raise InteropError(f"{block_path}: this block carries no adapters" + (f" under {root}" if root else ""), path=block_path)
    if left := [s.module_path for s in in_block if not s.module_path.startswith(under)]:
        # PEFT loads the adapter on the model at `root`: the others have no name there
        warnings.warn(f"{block_path}: {len(left)} adapters outside {root} are not written (first: {left[0]})", stacklevel=2)
    if len(kinds := {s.kind for s in slots}) != 1 or not kinds <= {"lora", "dora"}:
        raise InteropError(
            f"{block_path}: a PEFT adapter is all lora or all dora, this block has {sorted(kinds)}", path=block_path
        )
    rank, alpha = most_common([s.rank for s in slots]), most_common([s.alpha for s in slots])
    hosts = dict(iter_hosts(world))
    tensors: dict[str, torch.Tensor] = {}
    for s in slots:
        host = hosts[s.slot]
        for name, t in host.adapters[plan.name].state_dict().items():
            peft_shape = foreign_shape(name, host.geo, tuple(t.shape))
            tensors[PREFIX + s.module_path[len(under) :] + _suffix(name, host.geo.layer)] = t.detach().reshape(peft_shape).contiguous()
    modules = [s.module_path[len(under) :] for s in slots]
    all_paths = [n[len(under) :] for n, _ in world.block(canonical).module.named_modules() if n.startswith(under)]
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": None,
        "r": rank,
        "lora_alpha": _number(alpha),
        "target_modules": _targets(modules, all_paths),
        "rank_pattern": {f"^{re.escape(s.module_path[len(under) :])}": s.rank for s in slots if s.rank != rank},
        "alpha_pattern": {f"^{re.escape(s.module_path[len(under) :])}": _number(s.alpha) for s in slots if s.alpha != alpha},
        "use_rslora": slots[0].rslora,
        "use_dora": slots[0].kind == "dora",
        "fan_in_fan_out": all(s.layer == "gpt2_conv1d" for s in slots),
        "bias": "none",
        "lora_dropout": 0.0,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }
    out = Path(out_dir)
    files = {
        WEIGHTS: lambda path: save_file(tensors, path, metadata={"format": "pt"}),
        CONFIG: lambda path: path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n"),
    }
    try:
        _write_all(out, files)
    except (OSError, SafetensorError) as exc:
        raise InteropError(f"{out}: cannot write the PEFT adapter ({exc}); nothing was changed there", path=str(out)) from exc
    return out


def _write_all(out: Path, files: dict) -> None:
    """Write `files` ({name: write(path)}) into `out`, all or nothing.

    Each is written in full into a staging directory beside its target first. A new `out` is
    that directory, renamed into place; in an existing one (PEFT's `save_pretrained` overwrites
    its files, and keeps the others) the files are swapped in one by one, and a failure puts
    back those already swapped.
    """
    fresh = not out.exists()
    home = out.parent if fresh else out  # renames stay within one filesystem
    home.mkdir(parents=True, exist_ok=True)
    staging = home / f".{out.name}.{uuid.uuid4().hex[:12]}.tmp"
    staging.mkdir()
    try:
        for name, write in files.items():
            write(staging / name)
        if fresh:
            staging.rename(out)
        else:
            _swap_in(staging, out, list(files))
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already once renamed into place


def _swap_in(staging: Path, out: Path, names: list[str]) -> None:
    swapped: list[tuple[Path, Path | None]] = []  # (target, the file it replaced, kept in staging)
    try:
        for name in names:
            target, old = out / name, staging / f"{name}.old"
            kept = target.is_file() or target.is_symlink()
            if kept:
                os.rename(target, old)
            try:
                os.rename(staging / name, target)  # fails on a directory in the way
            except BaseException:
                if kept:
                    os.rename(old, target)
                raise
            swapped.append((target, old if kept else None))
    except BaseException:
        for target, old in reversed(swapped):
            if old is None:
                target.unlink()
            else:
                os.replace(old, target)
        raise
