"""A convolutional autoencoder: the zoo's ``codec`` block (pixels <-> latents).

With c the base width, every conv 3×3 and σ = SiLU:

    encode: img (B, 3, H, W) -> σ conv_in -> σ down1 (stride 2) -> σ down2 (stride 2)
            -> σ mid -> conv_out -> lat (B, 4, H/4, W/4)              widths c, 2c, 4c, 4c, 4
    decode: lat -> σ conv_in -> σ mid -> up ∘ σ up1 -> up ∘ σ up2 -> tanh conv_out -> (B, 3, H, W)
            widths 4c, 4c, 2c, c, 3;  up = nearest ×2 upsampling

Upsampling is nearest-neighbour followed by a conv rather than a transposed conv: no
checkerboard artefacts, and every layer of the codec is a plain ``nn.Conv2d`` that a
conv adapter can host. ``tanh`` keeps decoded pixels in [-1, 1].

Sizes: ``tiny`` c = 16 (125,639 parameters); ``small`` c = 96 (4,348,039).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..world.registry import register_block

SIZES: dict[str, dict[str, int]] = {
    "tiny": {"channels": 16, "latent_channels": 4},
    "small": {"channels": 96, "latent_channels": 4},
}


def conv(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1)


class Encoder(nn.Module):
    def __init__(self, c: int, latent: int) -> None:
        super().__init__()
        self.conv_in, self.down1, self.down2 = conv(3, c), conv(c, 2 * c, 2), conv(2 * c, 4 * c, 2)
        self.mid, self.conv_out = conv(4 * c, 4 * c), conv(4 * c, latent)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.conv_in(img))  # (B, c, H, W)
        h = F.silu(self.down1(h))  # (B, 2c, H/2, W/2)
        h = F.silu(self.down2(h))  # (B, 4c, H/4, W/4)
        return self.conv_out(F.silu(self.mid(h)))  # (B, 4, H/4, W/4)


class Decoder(nn.Module):
    def __init__(self, c: int, latent: int) -> None:
        super().__init__()
        self.conv_in, self.mid = conv(latent, 4 * c), conv(4 * c, 4 * c)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.up1, self.up2, self.conv_out = conv(4 * c, 2 * c), conv(2 * c, c), conv(c, 3)

    def forward(self, lat: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.mid(F.silu(self.conv_in(lat))))  # (B, 4c, H/4, W/4)
        h = F.silu(self.up1(self.up(h)))  # (B, 2c, H/2, W/2)
        h = F.silu(self.up2(self.up(h)))  # (B, c, H, W)
        return torch.tanh(self.conv_out(h))  # (B, 3, H, W)


class ConvCodec(nn.Module):
    def __init__(self, channels: int, latent_channels: int = 4) -> None:
        super().__init__()
        self.latent_channels = latent_channels
        self.encoder = Encoder(channels, latent_channels)
        self.decoder = Decoder(channels, latent_channels)

    def encode(self, img: torch.Tensor) -> torch.Tensor:
        """Latents (B, 4, H/4, W/4) for images (B, 3, H, W), H and W multiples of 4."""
        return self.encoder(img)

    def decode(self, lat: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, 4h, 4w) in [-1, 1] for latents (B, 4, h, w)."""
        return self.decoder(lat)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(img))  # (B, 3, H, W)


@register_block("conv_codec", "codec")
def conv_codec(**config) -> ConvCodec:
    return ConvCodec(**config)
