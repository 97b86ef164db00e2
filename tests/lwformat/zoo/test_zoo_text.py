"""The shipped corpora, byte tokens, and the zoo's public API."""

import pytest
import torch

import lwformat.zoo as zoo
from lwformat.zoo import DecoderLM, byte_tokens, load_text
from lwformat.zoo import lm


def test_public_api_is_pinned():
    assert zoo.__all__ == sorted(zoo.__all__)
    assert zoo.__all__ == [
        "ConvCodec", "DecoderLM", "DiT", "HFBert", "TextEncoder", "byte_tokens", "hf_block",
        "load_text", "minilm_block", "minilm_tokenize", "reference_spec", "reference_world",
    ]  # fmt: skip
    assert all(hasattr(zoo, name) for name in zoo.__all__)


@pytest.mark.parametrize(("name", "low", "high"), [("noir", 4000, 6000), ("plain", 2000, 3000)])
def test_corpora_ship_with_the_package(name, low, high):
    text = load_text(name)
    assert low <= len(text.encode("utf-8")) <= high
    assert text.isascii()


def test_corpora_differ_in_style():
    noir, plain = load_text("noir").lower(), load_text("plain").lower()
    assert all(w in noir for w in ("rain", "neon", "cigarette"))
    assert " i " in noir and " i " not in plain  # first person only in the noir


def test_unknown_corpus_is_refused():
    with pytest.raises(ValueError, match="unknown corpus"):
        load_text("romance")


def test_byte_tokens_windows():
    text = "abcdefghij"
    assert byte_tokens(text, 4).tolist() == [list(b"abcd"), list(b"efgh")]
    overlapping = byte_tokens(text, 4, stride=3)  # (3, 4)
    assert overlapping.tolist() == [list(b"abcd"), list(b"defg"), list(b"ghij")]
    assert overlapping.dtype == torch.long
    with pytest.raises(ValueError):
        byte_tokens("abc", 4)


def test_noir_windows_feed_the_tiny_lm():
    windows = byte_tokens(load_text("noir"), 65)  # (N, 65): 64 tokens of context plus the target
    assert windows.shape[0] >= 60 and windows.max() < 256
    torch.manual_seed(0)
    loss = DecoderLM(**lm.SIZES["tiny"]).loss(windows[:8])
    assert torch.isfinite(loss)
