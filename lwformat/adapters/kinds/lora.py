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

from ..layers import Geometry
from .base import Adapter, SlotSettings


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
            scaling = torch.tensor(self.settings.scaling, dtype=base.weight.dtype, device=base.weight.device)
        self._buffers["scaling"] = scaling  # register_buffer(persistent=False), minus its checks
        self._non_persistent_buffers_set.add("scaling")

    def reset(self, base: nn.Module) -> None:
        if self.geo.layer == "embedding":
            nn.init.zeros_(self.lora_A)
            nn.init.normal_(self.lora_B)
        else:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)

    def lora_delta(self, x: torch.Tensor, base: nn.Module) -> torch.Tensor:
        h = self.geo.down(x, self.lora_A, base)  # (..., r) or (B, r, *S)
        return self.scaling * self.geo.up(h, self.lora_B)  # like y

    def lora_matrix(self) -> torch.Tensor:
        A = self.lora_A.reshape(self.lora_A.shape[0], -1)  # (r, fan_in)
        return self.scaling * (self.lora_B @ A)  # (out, fan_in)

    def delta(self, x: torch.Tensor, y: torch.Tensor, base: nn.Module) -> torch.Tensor:
        return self.lora_delta(x, base)

    def add_to(self, out: torch.Tensor, x: torch.Tensor, y: torch.Tensor, base: nn.Module, *, inplace: bool) -> torch.Tensor:
        if self.geo.layer not in ("linear", "gpt2_conv1d") or type(self) is not LoRA:
            return super().add_to(out, x, y, base, inplace=inplace)
        # Scale the small (..., r) side and fuse the up-projection with the sum: one pass over `out`.
        h = F.linear(x, self.lora_A) * (self.mix_weight * self.scaling)  # (..., r)
        h2 = h.reshape(-1, h.shape[-1])  # (N, r)
        if inplace and out.is_contiguous():
            out.view(-1, out.shape[-1]).addmm_(h2, self.lora_B.t())  # (N, out) += (N, r) @ (r, out)
            return out
        return torch.addmm(out.reshape(-1, out.shape[-1]), h2, self.lora_B.t()).view(out.shape)  # (..., out)

    def delta_weight(self, base: nn.Module) -> tuple[torch.Tensor, None]:
        return self.geo.unmatrix(self.lora_matrix(), base.weight), None
