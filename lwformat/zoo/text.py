"""Small text corpora shipped with the zoo, and byte-level tokens for the tiny LLM.

    noir   first-person hard-boiled detective prose (about 4.5 KB), the style to learn
    plain  neutral descriptive prose (about 2.3 KB): gardening, a weather report

``byte_tokens`` cuts the UTF-8 bytes of a text into windows of ``block_size`` tokens,
ids 0..255, which is exactly the tiny ``decoder_lm`` vocabulary:

    windows[i] = bytes[i·stride : i·stride + block_size]          (N, block_size)
"""

from __future__ import annotations

from importlib import resources

import torch

CORPORA = ("noir", "plain")


def load_text(name: str) -> str:
    """The corpus `name` (one of `CORPORA`) as text."""
    if name not in CORPORA:
        raise ValueError(f"unknown corpus {name!r}; expected one of {CORPORA}")
    return resources.files(__package__).joinpath("data", f"{name}.txt").read_text(encoding="utf-8")


def byte_tokens(text: str, block_size: int, *, stride: int | None = None) -> torch.Tensor:
    """Windows (N, block_size) of the text's UTF-8 byte ids, int64.

    `stride` defaults to `block_size` (disjoint windows); a trailing partial window is
    dropped so every row is full. For next-token training use ``block_size = context + 1``.
    """
    stride = stride or block_size
    if block_size < 1 or stride < 1:
        raise ValueError(f"block_size and stride must be positive, got {block_size} and {stride}")
    data = torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()  # (L,)
    if data.numel() < block_size:
        raise ValueError(f"text of {data.numel()} bytes is shorter than one block of {block_size}")
    return data.unfold(0, block_size, stride).contiguous()  # (N, block_size)
