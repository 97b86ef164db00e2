import pytest
import torch

from lwformat.zoo import reference_world


@pytest.fixture
def tiny_world():
    return reference_world("tiny", seed=0)


@pytest.fixture
def prompt():
    """Two byte-level prompts of 16 tokens, the second right-padded after 13."""
    tokens = torch.tensor([list(b"The rain fell on"), list(b"Neon at night\0\0\0")], dtype=torch.long)  # (2, 16)
    mask = torch.ones_like(tokens)
    mask[1, 13:] = 0
    return {"tokens": tokens, "attention_mask": mask}
