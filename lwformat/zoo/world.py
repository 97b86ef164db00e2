"""The reference world: five stages, every zoo block, one LLM shared by two stages.

    philosopher/reflect/ideas/conditioner     text_encoder             flow reflect
    author/narrate/text/llm                   decoder_lm               flow narrate
    environment/describe/text/llm             ref -> author/narrate/text/llm   flow describe
    architect/layout/scene/conditioner        text_encoder             flow layout
    creator/render/t2i/conditioner            text_encoder             flow t2i
    creator/render/t2i/backbone               dit
    creator/render/t2i/codec                  conv_codec

    cycle: philosopher -> author -> environment -> architect -> creator -> philosopher

The environment describes the scene with the author's LLM: one set of weights, two
paths, the canonical one being ``author/narrate/text/llm`` (built first in config order).
All blocks of a size share one vocabulary (bytes for ``tiny``, GPT-2's for ``small``),
so a single ``state["tokens"]`` prompt feeds the whole world.

Parameters (each shared block counted once): ``tiny`` 434,379; ``small`` 231,534,891, of
which the LLM is GPT-2 small (124,439,808), the three conditioners 19.3M each, the
backbone 44.8M and the codec 4.3M.
"""

from __future__ import annotations

import torch

from ..world.config import GraphSpec, NodeSpec, PipelineSpec, StageSpec, WorldSpec
from ..world.tree import World
from . import backbone, codec, encoder, lm

STAGES = ("philosopher", "author", "environment", "architect", "creator")
SHARED_LLM = "author/narrate/text/llm"


def _stage(pipeline: str, graph: str, flow: str, nodes: dict[str, NodeSpec]) -> StageSpec:
    return StageSpec(pipelines={pipeline: PipelineSpec(graphs={graph: GraphSpec(nodes=nodes, flow=flow)})})


def reference_spec(size: str = "tiny") -> WorldSpec:
    """The reference world's config at `size` (``"tiny"`` or ``"small"``), every block config spelled out."""
    if size not in lm.SIZES:
        raise ValueError(f"unknown size {size!r}; expected one of {sorted(lm.SIZES)}")
    def enc() -> NodeSpec:  # a fresh spec per node: the three conditioners are distinct blocks
        return NodeSpec(block="text_encoder", config=dict(encoder.SIZES[size]))

    dit = dict(backbone.SIZES[size], cond_dim=encoder.SIZES[size]["dim"])
    stages = {
        "philosopher": _stage("reflect", "ideas", "reflect", {"conditioner": enc()}),
        "author": _stage("narrate", "text", "narrate", {
            "llm": NodeSpec(block="decoder_lm", config=dict(lm.SIZES[size])),
        }),
        "environment": _stage("describe", "text", "describe", {"llm": NodeSpec(ref=SHARED_LLM)}),
        "architect": _stage("layout", "scene", "layout", {"conditioner": enc()}),
        "creator": _stage("render", "t2i", "t2i", {
            "conditioner": enc(),
            "backbone": NodeSpec(block="dit", config=dit),
            "codec": NodeSpec(block="conv_codec", config=dict(codec.SIZES[size])),
        }),
    }  # fmt: skip
    return WorldSpec(stages=stages, name=f"reference-{size}", cycle=list(STAGES))


def reference_world(size: str = "tiny", seed: int = 0, device: torch.device | str | None = None) -> World:
    """Build the reference world with weights drawn from `seed`; ``device="meta"`` allocates nothing.

    The global RNG is forked, so building a world neither depends on nor disturbs it.
    """
    spec = reference_spec(size)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return World.from_spec(spec, device=device)
