"""The two sides of the runtime benchmark, built from the same weights.

Ours: the ``small`` reference world (its LLM is GPT-2 small, 124M parameters), and
bundles written from it with LoRA r=16, alpha=32 on the 48 attention and MLP
projections of the LLM. PEFT: a deep copy of the same LLM module (before any
customization), ``get_peft_model`` with ``LoraConfig(r=16, lora_alpha=32,
target_modules=["qkv", "proj", "fc"])``, and adapter directories written with
``save_pretrained`` that hold bit for bit the same factors as our bundles:

    bundle i:  A_l ~ U(-1/√in, 1/√in) (r, in),  B_l ~ N(0, 0.02²) (out, r),  s = 32/16 = 2

so both libraries compute ``y = W x + b + s·B(A x)`` with the same numbers.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer

from lwformat.adapters.checkpoint import adapter_tensors
from lwformat.adapters.config import LightConfig
from lwformat.bundle.write import write_bundle
from lwformat.world.tree import World
from lwformat.zoo import reference_world

LM = "author/narrate/text/llm"
RANK, ALPHA = 16, 32
CONFIG = LightConfig(
    kind="lora", rank=RANK, alpha=ALPHA, blocks=[LM],
    slots=["*.attn.qkv", "*.attn.proj", "*.mlp.fc", "*.mlp.proj"],
)  # fmt: skip
PEFT_CONFIG = dict(r=RANK, lora_alpha=ALPHA, target_modules=["qkv", "proj", "fc"])
LAYERS = 48  # 12 layers x (qkv, attn.proj, fc, mlp.proj)

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]  # module path -> (A (r, in), B (out, r))


@dataclass
class Sides:
    world: World
    lm: torch.nn.Module  # the world's LLM block module (adapter hosts appear in it when applied)
    peft: PeftModel  # its "default" adapter holds bundle 0
    ours: list[Path]  # bundle directories
    theirs: list[Path]  # PEFT adapter directories, the same factors
    factors: list[Factors]
    adapter_bytes: int  # bytes of one adapter's tensors


def random_factors(world: World, seed: int) -> Factors:
    """Fill the customized world's adapters with bundle `seed`'s factors; return copies by module path."""
    gen = torch.Generator().manual_seed(seed)
    live = adapter_tensors(world)
    out: Factors = {}
    with torch.no_grad():
        for key, A in live.items():
            if not key.endswith(".lora_A"):
                continue
            stem = key.removesuffix(".lora_A")
            B = live[stem + ".lora_B"]
            bound = 1 / math.sqrt(A.shape[1])
            A.copy_(torch.rand(A.shape, generator=gen) * 2 * bound - bound)  # (r, in)
            B.copy_(torch.randn(B.shape, generator=gen) * 0.02)  # (out, r)
            out[stem.partition(":")[2]] = (A.clone(), B.clone())
    return out


def peft_layers(model: torch.nn.Module) -> dict[str, LoraLayer]:
    """PEFT's LoRA layers by module path relative to the LLM (``blocks.0.attn.qkv``)."""
    prefix = "base_model.model."
    return {n.removeprefix(prefix): m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def load_factors(model: PeftModel, factors: Factors, adapter: str = "default") -> None:
    layers = peft_layers(model)
    if set(layers) != set(factors):
        raise RuntimeError(f"PEFT adapts {len(layers)} layers, our bundles {len(factors)}: the targets differ")
    with torch.no_grad():
        for path, (A, B) in factors.items():
            layers[path].lora_A[adapter].weight.copy_(A)
            layers[path].lora_B[adapter].weight.copy_(B)


def build(root: Path, count: int) -> Sides:
    """The world, `count` bundles and `count` PEFT adapter directories with the same factors."""
    world = reference_world("small", seed=0)
    world.eval()
    lm = world.block(LM).module
    peft = get_peft_model(copy.deepcopy(lm), LoraConfig(**PEFT_CONFIG)).eval()
    if len(peft_layers(peft)) != LAYERS:
        raise RuntimeError(f"PEFT's target_modules match {len(peft_layers(peft))} layers, expected {LAYERS}")
    plan = world.customize(CONFIG)
    if len(plan.slots) != LAYERS:
        raise RuntimeError(f"our slot patterns match {len(plan.slots)} layers, expected {LAYERS}")
    ours, theirs, all_factors = [], [], []
    for i in range(count):
        factors = random_factors(world, seed=i)
        out = root / f"ours-{i}"
        write_bundle(world, out, name=f"author/style-{i}", version="1.0.0")
        load_factors(peft, factors)
        peft.save_pretrained(str(root / f"peft-{i}"))
        ours.append(out)
        theirs.append(root / f"peft-{i}")
        all_factors.append(factors)
    adapter_bytes = sum(t.numel() * t.element_size() for t in adapter_tensors(world).values())
    world.decustomize()
    load_factors(peft, all_factors[0])
    world.digests()  # hash the base once (decision 1 caches it), outside every timed region
    return Sides(world, lm, peft, ours, theirs, all_factors, adapter_bytes)
