"""The layers adapters can wrap, described in the few terms every adapter kind needs.

Each supported base layer computes ``y = f(x; W) + b`` with ``out`` output channels.
Adapters see it through a `Geometry`:

    down(x, A)    x through a layer of the base's input shape with ``A.shape[0]`` outputs
                  (A: (r, in, *kernel) for convs, (r, in) otherwise)       -> (..., r) or (B, r, *S)
    up(h, B)      a 1×1 map from r channels to ``out`` (B: (out, r))      -> like y
    channels(v)   a per-output-channel vector shaped to broadcast against y
    matrix(W)     the base weight as an (out, fan_in) matrix; `unmatrix` inverts it

Supported: ``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d`` (groups=1, zero padding),
``nn.Embedding`` (no max_norm) and GPT-2's ``Conv1D`` (weight stored (in, out)).

Adapters on a half-precision layer (float16, bfloat16) live and compute in float32, as
PEFT's ``autocast_adapter_dtype`` does, and their sum is rounded once to the layer's
dtype: a small gain (1.003) or delta would otherwise round away. `adapter_dtype` says which.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

HALF = (torch.float16, torch.bfloat16)


def adapter_dtype(base_dtype: torch.dtype) -> torch.dtype:
    """The dtype adapters on a layer of `base_dtype` live in: float32 on a half-precision layer, else the layer's."""
    return torch.float32 if base_dtype in HALF else base_dtype


def _is_gpt2_conv1d(layer: nn.Module) -> bool:
    # transformers' Conv1D is a Linear with a transposed weight; matched by name to avoid importing transformers.
    return type(layer).__name__ == "Conv1D" and hasattr(layer, "nf") and getattr(layer, "weight", None) is not None


@dataclass(frozen=True)
class Geometry:
    layer: str  # "linear" | "gpt2_conv1d" | "conv1d" | "conv2d" | "embedding"
    fan_in: int  # inputs seen by one output: in_features, or in_channels * prod(kernel)
    out: int
    in_shape: tuple[int, ...]  # one row of a down-projection: (in,) or (in, *kernel)

    @property
    def is_conv(self) -> bool:
        return self.layer in ("conv1d", "conv2d")

    @property
    def max_rank(self) -> int:
        return min(self.fan_in, self.out)

    def down(self, x: torch.Tensor, A: torch.Tensor, base: nn.Module) -> torch.Tensor:
        if self.layer in ("linear", "gpt2_conv1d"):
            return F.linear(x, A)  # (..., in) @ (r, in)^T -> (..., r)
        if self.layer == "embedding":
            return F.embedding(x, A.t(), padding_idx=base.padding_idx)  # (...,) -> (..., r)
        conv = F.conv1d if self.layer == "conv1d" else F.conv2d
        return conv(x, A, None, base.stride, base.padding, base.dilation)  # (B, in, *S) -> (B, r, *S')

    def up(self, h: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        if self.is_conv:
            return torch.einsum("or,br...->bo...", B, h)  # (B, r, *S) -> (B, out, *S)
        return F.linear(h, B)  # (..., r) -> (..., out)

    def channels(self, v: torch.Tensor) -> torch.Tensor:
        if self.is_conv:
            return v.view(-1, *([1] * len(self.in_shape[1:])))  # (out,) -> (out, 1[, 1])
        return v  # (out,) broadcasts over (..., out)

    @property
    def channel_dim(self) -> int:
        return 1 if self.is_conv else -1

    def matrix(self, W: torch.Tensor) -> torch.Tensor:
        if self.layer in ("gpt2_conv1d", "embedding"):
            return W.t()  # (in, out) -> (out, in)
        return W.reshape(self.out, -1)  # (out, in[, *k]) -> (out, fan_in)

    def unmatrix(self, M: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        if self.layer in ("gpt2_conv1d", "embedding"):
            return M.t()
        return M.reshape(like.shape)

    def kaiming_bound(self) -> float:
        # kaiming_uniform_(a=sqrt(5)) on a (r, fan_in) matrix, as nn.Linear and PEFT initialise A.
        return 1.0 / math.sqrt(self.fan_in)


def geometry(layer: nn.Module) -> Geometry | None:
    """The geometry of a supported layer, or None when no adapter can wrap it."""
    if _is_gpt2_conv1d(layer):
        n_in, n_out = layer.weight.shape
        return Geometry("gpt2_conv1d", n_in, n_out, (n_in,))
    if isinstance(layer, nn.Linear):
        return Geometry("linear", layer.in_features, layer.out_features, (layer.in_features,))
    if isinstance(layer, nn.Embedding):
        if layer.max_norm is not None:
            return None  # max_norm renormalises the weight in place on every lookup
        return Geometry("embedding", layer.num_embeddings, layer.embedding_dim, (layer.num_embeddings,))
    if isinstance(layer, (nn.Conv1d, nn.Conv2d)) and type(layer) in (nn.Conv1d, nn.Conv2d):
        if layer.groups != 1 or layer.padding_mode != "zeros":
            return None
        kernel = tuple(layer.kernel_size)
        name = "conv1d" if isinstance(layer, nn.Conv1d) else "conv2d"
        return Geometry(name, layer.in_channels * math.prod(kernel), layer.out_channels, (layer.in_channels, *kernel))
    return None


def base_bias(layer: nn.Module) -> torch.Tensor | None:
    return getattr(layer, "bias", None) if not isinstance(layer, nn.Embedding) else None
