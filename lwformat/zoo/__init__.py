"""The reference zoo: blocks, flows and a five-stage reference world, in tiny and small sizes.

Importing this package registers every zoo block implementation (``decoder_lm``,
``text_encoder``, ``dit``, ``conv_codec``, ``hf_bert``) and flow (``reflect``,
``narrate``, ``describe``, ``layout``, ``t2i``); the world registry imports it on its
own when a config names one of them. ``transformers`` is only needed to build or load
``hf_bert`` blocks.
"""

from . import flows  # noqa: F401  (registers the flows)
from .backbone import DiT
from .codec import ConvCodec
from .encoder import TextEncoder
from .hf import HFBert, hf_block, minilm_block, minilm_tokenize
from .lm import DecoderLM
from .text import byte_tokens, load_text
from .world import reference_spec, reference_world

__all__ = [
    "ConvCodec",
    "DecoderLM",
    "DiT",
    "HFBert",
    "TextEncoder",
    "byte_tokens",
    "hf_block",
    "load_text",
    "minilm_block",
    "minilm_tokenize",
    "reference_spec",
    "reference_world",
]
