"""Real bundles on disk, written from customized reference worlds, for the runtime tests."""

from __future__ import annotations

import itertools
import json
import struct
from pathlib import Path

import pytest
import torch

from lwformat import LightConfig
from lwformat.bundle.read import Bundle
from lwformat.bundle.write import write_bundle
from lwformat.zoo import reference_world

LM = "author/narrate/text/llm"
_count = itertools.count()


def trained_world(seed: int, *, kind: str = "lora", rank: int = 4, blocks=(LM,), slots=(), world_seed: int = 0, alpha: float | None = None):
    world = reference_world("tiny", seed=world_seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)  # adapter initialisation draws from the global generator
        world.customize(LightConfig(kind=kind, rank=rank, alpha=alpha or 2 * rank, neurons=4, blocks=list(blocks), slots=list(slots)))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in world.adapter_parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return world


def make_bundle(root: Path, seed: int, *, name: str = "author/noir", **kwargs) -> Bundle:
    out = root / f"bundle-{next(_count)}"
    write_bundle(trained_world(seed, **kwargs), out, name=name, version="1.0.0")
    return Bundle.open(out)


def poisoned(root: Path, seed: int, values: list[float], **kwargs) -> tuple[Bundle, str]:
    """A bundle whose weights file, written first, then has `values` (float32) put at the start
    of its last tensor, as a bundle made by another tool might arrive; and that tensor's key."""
    bundle = make_bundle(root, seed, **kwargs)
    path = bundle.weights_path
    data = bytearray(path.read_bytes())
    size = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + size])
    key, entry = max(((k, v) for k, v in header.items() if k != "__metadata__"), key=lambda kv: kv[1]["data_offsets"][0])
    assert entry["dtype"] == "F32"
    at = 8 + size + entry["data_offsets"][0]
    data[at : at + 4 * len(values)] = struct.pack(f"<{len(values)}f", *values)
    path.write_bytes(bytes(data))
    return Bundle.open(path.parent), key


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    root = tmp_path_factory.mktemp("bundles")
    return {
        "noir": make_bundle(root, 1, name="author/noir"),
        "rain": make_bundle(root, 2, name="author/rain"),
        "noir2": make_bundle(root, 3, name="author/noir"),  # same layout as noir
        "small": make_bundle(root, 4, name="author/small", rank=2),
        "big": make_bundle(root, 5, name="author/big", rank=8),
        "creator": make_bundle(root, 6, name="creator/ink", rank=2, blocks=("creator/**",)),
    }


@pytest.fixture
def world():
    return reference_world("tiny", seed=0)


def tokens(batch: int = 3, length: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


def converted_bundle(root: Path, seed: int, value: float | None = None, *, base: torch.dtype, stored: torch.dtype,
                     name: str = "author/noir") -> Bundle:  # fmt: skip
    """A bias bundle of `stored` dtype bound to the reference world in `base`, the first value of its
    first tensor set to `value`: finite in the file, perhaps not in the dtype the world stores it in."""
    world = reference_world("tiny", seed=0).to(base)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        world.customize(LightConfig(kind="bias", blocks=[LM], slots=["*fc"]))
    params = list(world.adapter_parameters())
    with torch.no_grad():
        for p in params:
            p.data = (torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)) * 0.05).to(stored)  # (out,)
        if value is not None:
            params[0][0] = value
    out = root / f"bundle-{next(_count)}"
    write_bundle(world, out, name=name, version="1.0.0")
    return Bundle.open(out)


def narrowing_bundle(root: Path, seed: int, value: float | None = None, *, name: str = "author/noir") -> Bundle:
    """A float64 bundle on the float32 reference world, which stores it converted to float32: the
    one conversion that narrows (a half base stores its adapters in float32, which holds every
    float16 and bfloat16 value)."""
    return converted_bundle(root, seed, value, base=torch.float32, stored=torch.float64, name=name)


def half_base_bundle(root: Path, seed: int, value: float | None = None, *, name: str = "author/noir") -> Bundle:
    """A float32 bundle bound to the float16 reference world: stored there in float32, as written."""
    return converted_bundle(root, seed, value, base=torch.float16, stored=torch.float32, name=name)
