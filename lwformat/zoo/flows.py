"""Flows of the reference world: what each stage's graph computes, and where it writes.

Flows read the shared prompt ``state["tokens"]`` (B, T) and, when present, its padding
mask ``state["attention_mask"]`` (B, T). Each writes under its stage's name,
``"<stage>.<key>"``, so that stages running one after another never overwrite each
other's outputs:

    flow      nodes                         reads                 writes
    reflect   conditioner                   tokens                philosopher.embedding (B, T, Dc)
    narrate   llm                           tokens                author.logits (B, T, V), author.tokens (B, T)
    describe  llm                           author.tokens|tokens  environment.logits (B, T, V)
    layout    conditioner                   tokens                architect.embedding (B, T, Dc)
    t2i       conditioner, backbone, codec  tokens, noise?        creator.latents (B, C, h, w),
                                                                  creator.image (B, 3, 4h, 4w)

``author.tokens`` is the author's greedy next token at every position; the environment
describes that continuation (falling back to the prompt when no author ran), so one
shared LLM yields two different readings in one pass of the cycle.

``t2i`` takes one denoising step at the fixed time t = 1/2 of a cosine schedule:

    ᾱ(t) = cos²(πt/2),  x_t = noise,  ε = backbone(x_t, t, cond),  x₀ = (x_t − √(1−ᾱ)·ε) / √ᾱ
    image = codec.decode(x₀)

Flows are deterministic: the noise is ``state["noise"]`` when given, else one fixed
sample drawn from a private generator (never the global RNG) and shared by every row,
so a prompt's image does not depend on the batch it runs in.
"""

from __future__ import annotations

import math

import torch

from ..errors import WorldConfigError
from ..world.registry import register_flow
from ..world.tree import Block, Graph

T2I_TIME = 0.5
NOISE_SEED = 0


def alpha_bar(t: float) -> float:
    """Cosine schedule: the fraction of signal variance left at time t ∈ [0, 1]."""
    return math.cos(math.pi * t / 2) ** 2


def node(graph: Graph, name: str, flow: str) -> Block:
    if name not in graph.nodes:
        raise WorldConfigError(f"flow {flow!r} needs a node {name!r}; the graph has {list(graph.nodes)}")
    return graph.nodes[name]


@register_flow("narrate")
def narrate(graph: Graph, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """tokens -> llm -> author.logits, and the greedy next tokens as author.tokens."""
    logits = node(graph, "llm", "narrate")(state["tokens"])  # (B, T, V)
    return {"author.logits": logits, "author.tokens": logits.argmax(dim=-1)}  # (B, T, V), (B, T)


@register_flow("describe")
def describe(graph: Graph, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """author.tokens (else tokens) -> llm -> environment.logits."""
    tokens = state["author.tokens"] if "author.tokens" in state else state["tokens"]  # (B, T)
    return {"environment.logits": node(graph, "llm", "describe")(tokens)}  # (B, T, V)


def _register_encoder(flow: str, stage: str) -> None:
    @register_flow(flow)
    def run(graph: Graph, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        conditioner = node(graph, "conditioner", flow)
        return {f"{stage}.embedding": conditioner(state["tokens"], state.get("attention_mask"))}  # (B, T, Dc)

    run.__doc__ = f"tokens -> conditioner -> {stage}.embedding"


_register_encoder("reflect", "philosopher")
_register_encoder("layout", "architect")


def default_noise(shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """Standard normal noise from a fixed-seed CPU generator: the same on every device, call and row."""
    generator = torch.Generator().manual_seed(NOISE_SEED)
    sample = torch.randn((1, *shape[1:]), generator=generator)  # (1, C, h, w)
    return sample.expand(shape).to(device=like.device, dtype=like.dtype)  # (B, C, h, w)


@register_flow("t2i")
def t2i(graph: Graph, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """tokens -> conditioner -> cond; one denoising step of backbone; codec.decode -> creator.image."""
    conditioner, backbone, codec = (node(graph, n, "t2i") for n in ("conditioner", "backbone", "codec"))
    tokens, mask = state["tokens"], state.get("attention_mask")
    cond = conditioner(tokens, mask)  # (B, S, Dc)
    dit = backbone.module
    shape = (tokens.shape[0], dit.channels, dit.latent_size, dit.latent_size)
    x_t = state["noise"] if "noise" in state else default_noise(shape, cond)  # (B, C, h, w)
    t = torch.full((shape[0],), T2I_TIME, device=x_t.device, dtype=x_t.dtype)  # (B,)
    eps = backbone(x_t, t, cond, mask)  # (B, C, h, w)
    a = alpha_bar(T2I_TIME)
    latents = (x_t - math.sqrt(1 - a) * eps) / math.sqrt(a)  # (B, C, h, w)
    image = codec.module.decode(latents)  # (B, 3, 4h, 4w)
    return {"creator.latents": latents, "creator.image": image}
