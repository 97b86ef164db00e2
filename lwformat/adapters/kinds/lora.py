"""LoRA: a low-rank update of the layer (Hu et al., 2021), with the rsLoRA scaling option.

    y += s · B(A(x)),   s = alpha / r   (rsLoRA: alpha / √r)
    A: (r, *in_shape)   B: (out, r)      merged: W += s · B @ A   (as an (out, fan_in) matrix)

A starts Kaiming-uniform and B at zero, so training starts from the base; for
embeddings the roles swap (A zero, B normal), as in PEFT.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import Geometry, adapter_dtype
from .base import Adapter, SlotSettings

MATMUL_LAYERS = ("linear", "gpt2_conv1d")  # layers whose LoRA delta is x @ Aᵀ @ Bᵀ on the last dimension


class LoRA(Adapter):
    kind = "lora"
    uses_rank = True

    @classmethod
    def shapes(cls, geo: Geometry, settings: SlotSettings) -> dict[str, tuple[int, ...]]:
        return {"lora_A": (settings.rank, *geo.in_shape), "lora_B": (geo.out, settings.rank)}

    def add_buffers(self, base: nn.Module, tensors: dict[str, torch.Tensor] | None) -> None:
        # A tensor, not a float: a swap to another alpha or rank then recompiles nothing.
        if tensors is not None and "scaling" in tensors:
            scaling = tensors["scaling"]  # a view into the applied storage, holding settings.scaling
        else:
            dtype = adapter_dtype(base.weight.dtype)
            scaling = torch.tensor(self.settings.scaling, dtype=dtype, device=base.weight.device)
        self._buffers["scaling"] = scaling  # register_buffer(persistent=False), minus its checks
        self._non_persistent_buffers_set.add("scaling")

    def reset(self, base: nn.Module) -> None:
        if self.geo.layer == "embedding":
            nn.init.zeros_(self.lora_A)
            nn.init.normal_(self.lora_B)
        else:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)

    def dropped(self, x: torch.Tensor) -> torch.Tensor:
        """`x` through dropout while training, as PEFT's ``lora_dropout`` (a fresh mask per call)."""
        return F.dropout(x, self.dropout, training=True) if self.dropout and self.training else x

    def lora_delta(self, x: torch.Tensor, base: nn.Module) -> torch.Tensor:
        h = self.geo.down(x, self.lora_A, base)  # (..., r) or (B, r, *S)
        return self.scaling * self.geo.up(h, self.lora_B)  # like y

    def lora_matrix(self) -> torch.Tensor:
        A = self.lora_A.reshape(self.lora_A.shape[0], -1)  # (r, fan_in)
        return self.scaling * (self.lora_B @ A)  # (out, fan_in)

    def delta(self, x: torch.Tensor, y: torch.Tensor, base: nn.Module) -> torch.Tensor:
        return self.lora_delta(self.dropped(x), base)

    def down(self, x: torch.Tensor) -> torch.Tensor:
        """The scaled down-projection ``w·s·(x @ Aᵀ)``, on a layer of `MATMUL_LAYERS`."""
        return F.linear(self.dropped(x), self.lora_A) * (self.mix_weight * self.scaling)  # (..., r)

    def up_add(self, out: torch.Tensor, h: torch.Tensor, *, inplace: bool) -> torch.Tensor:
        """``out + h @ Bᵀ`` for ``h = down(x)``: the up-projection fused with the sum, one pass over `out`."""
        h2 = h.reshape(-1, h.shape[-1])  # (N, r)
        if inplace and out.is_contiguous():
            out.view(-1, out.shape[-1]).addmm_(h2, self.lora_B.t())  # (N, out) += (N, r) @ (r, out)
            return out
        return torch.addmm(out.reshape(-1, out.shape[-1]), h2, self.lora_B.t()).view(out.shape)  # (..., out)

    def add_to(self, out: torch.Tensor, x: torch.Tensor, y: torch.Tensor, base: nn.Module, *, inplace: bool) -> torch.Tensor:
        if type(self) is not LoRA or self.geo.layer not in MATMUL_LAYERS:
            return super().add_to(out, x, y, base, inplace=inplace)
        return self.up_add(out, self.down(x), inplace=inplace)

    def delta_weight(self, base: nn.Module) -> tuple[torch.Tensor, None]:
        return self.geo.unmatrix(self.lora_matrix(), base.weight), None
