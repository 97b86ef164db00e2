"""Customize the reference world into a light noir world, train it, save it, reload it.

Run: `python examples/train_light_world.py` (after `make install`).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from lwformat import LightConfig, World
from lwformat.zoo import reference_world
from lwformat.zoo.text import byte_tokens, load_text


def lm_loss(world: World, tokens: torch.Tensor) -> float:
    with torch.no_grad():
        return world.block("author/narrate/text/llm").module.loss(tokens).item()


def main() -> None:
    start = time.perf_counter()
    torch.manual_seed(0)
    world = reference_world("tiny", seed=0)
    print(world.tree(), "\n")
    base_root = world.root_digest()

    config = LightConfig(kind="lora", rank=4, alpha=8, block_types=["llm", "backbone", "conditioner"])
    print(world.plan(config), "\n")  # the dry run: exactly what will be injected
    world.customize(config)

    noir, plain = byte_tokens(load_text("noir"), 65), byte_tokens(load_text("plain"), 65)  # (N, 65) each
    lm = world.block("author/narrate/text/llm").module
    opt = torch.optim.AdamW(world.adapter_parameters(), lr=1e-2)
    print(f"before: noir loss {lm_loss(world, noir):.3f}, plain loss {lm_loss(world, plain):.3f}")
    for step in range(150):
        batch = noir[torch.randint(0, len(noir), (16,))]  # (16, 65)
        opt.zero_grad()
        lm.loss(batch).backward()
        opt.step()
        if step % 50 == 49:
            print(f"step {step + 1}: noir loss {lm_loss(world, noir):.3f}")
    print(f"after:  noir loss {lm_loss(world, noir):.3f}, plain loss {lm_loss(world, plain):.3f}")

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "noir.safetensors"
        world.save_adapters(path)
        print(f"\nlight checkpoint: {path.stat().st_size / 1e3:.1f} kB for {world.customization[1].num_params:,} adapter parameters")
        fresh = reference_world("tiny", seed=0)
        fresh.load_adapters(path)
        assert lm_loss(fresh, noir) == lm_loss(world, noir)
    world.decustomize()
    assert world.root_digest() == base_root, "the base world must be bit-identical after training"
    print(f"base world unchanged: {base_root}")
    print(f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
