"""The zoo's blocks one by one: shapes, layer names, the math they claim."""

import pytest
import torch
from torch import nn

from lwformat.world.registry import block_impl, build_block
from lwformat.zoo import ConvCodec, DecoderLM, DiT, TextEncoder
from lwformat.zoo import backbone, codec, encoder, lm

PROJECTIONS = ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")


@pytest.fixture
def tiny_lm():
    torch.manual_seed(0)
    return DecoderLM(**lm.SIZES["tiny"])


@pytest.mark.parametrize(
    ("name", "type", "cls"),
    [("decoder_lm", "llm", DecoderLM), ("text_encoder", "conditioner", TextEncoder),
     ("dit", "backbone", DiT), ("conv_codec", "codec", ConvCodec)],
)  # fmt: skip
def test_registered_with_their_block_type(name, type, cls):
    sizes = {"decoder_lm": lm, "text_encoder": encoder, "dit": backbone, "conv_codec": codec}[name].SIZES
    module, block_type = build_block(name, dict(sizes["tiny"]))
    assert isinstance(module, cls) and block_type == type == block_impl(name).type


def test_small_lm_has_the_48_gpt2_projections():
    with torch.device("meta"):
        model = DecoderLM(**lm.SIZES["small"])
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert set(linears) == {f"blocks.{i}.{p}" for i in range(12) for p in PROJECTIONS} | {"head"}
    assert model.head.weight is model.tok.weight  # the tied head
    assert linears["blocks.0.attn.qkv"].weight.shape == (3 * 768, 768)
    assert linears["blocks.11.mlp.fc"].weight.shape == (4 * 768, 768)


def test_lm_logits_shape_and_tied_head(tiny_lm):
    tokens = torch.randint(0, 256, (2, 10))
    logits = tiny_lm(tokens)  # (2, 10, 256)
    assert logits.shape == (2, 10, 256)
    assert "head.weight" not in dict(tiny_lm.named_parameters())  # the head *is* tok.weight
    with torch.no_grad():
        tiny_lm.tok.weight[7].add_(1.0)
    assert not torch.allclose(tiny_lm(tokens)[..., 7], logits[..., 7])


def test_lm_is_causal(tiny_lm):
    a = torch.randint(0, 256, (1, 12))
    b = a.clone()
    b[0, 8:] = (b[0, 8:] + 1) % 256
    la, lb = tiny_lm(a), tiny_lm(b)
    assert torch.equal(la[:, :8], lb[:, :8])
    assert not torch.allclose(la[:, 8:], lb[:, 8:])


def test_lm_loss_is_finite_and_trains_every_weight(tiny_lm):
    tokens = torch.randint(0, 256, (4, 33))
    loss = tiny_lm.loss(tokens)
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert abs(loss.item() - torch.log(torch.tensor(256.0)).item()) < 0.5  # near uniform at init
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in tiny_lm.parameters())


def test_lm_rejects_sequences_past_its_context(tiny_lm):
    with pytest.raises(ValueError, match="context"):
        tiny_lm(torch.zeros(1, 257, dtype=torch.long))


def test_lm_computes_gpt2():
    import transformers
    config = transformers.GPT2Config(
        vocab_size=256, n_positions=256, n_embd=64, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0
    )
    torch.manual_seed(0)
    ref = transformers.GPT2LMHeadModel(config).eval()
    model = DecoderLM(**lm.SIZES["tiny"])
    sd = ref.state_dict()
    ours = {"tok.weight": sd["transformer.wte.weight"], "pos.weight": sd["transformer.wpe.weight"],
            "ln_f.weight": sd["transformer.ln_f.weight"], "ln_f.bias": sd["transformer.ln_f.bias"]}  # fmt: skip
    names = {"ln1": "ln_1", "ln2": "ln_2", "attn.qkv": "attn.c_attn", "attn.proj": "attn.c_proj",
             "mlp.fc": "mlp.c_fc", "mlp.proj": "mlp.c_proj"}  # fmt: skip
    for i in range(2):
        for mine, theirs in names.items():
            w = sd[f"transformer.h.{i}.{theirs}.weight"]
            # GPT-2's Conv1D stores (in, out); nn.Linear stores (out, in).
            ours[f"blocks.{i}.{mine}.weight"] = w.T if mine.startswith(("attn", "mlp")) else w
            ours[f"blocks.{i}.{mine}.bias"] = sd[f"transformer.h.{i}.{theirs}.bias"]
    ours["head.weight"] = ours["tok.weight"]  # tied, as in GPT-2
    model.load_state_dict(ours)
    tokens = torch.randint(0, 256, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), ref(tokens).logits, rtol=1e-4, atol=1e-4)


def test_encoder_is_bidirectional_and_ignores_padding():
    torch.manual_seed(0)
    enc = TextEncoder(**encoder.SIZES["tiny"])
    tokens = torch.randint(1, 256, (1, 9))
    out = enc(tokens)  # (1, 9, 32)
    assert out.shape == (1, 9, 32)
    changed = tokens.clone()
    changed[0, -1] += 1 if changed[0, -1] < 255 else -1
    assert not torch.allclose(enc(changed)[0, 0], out[0, 0])  # the first token sees the last
    padded = torch.cat([tokens, torch.zeros(1, 4, dtype=torch.long)], dim=1)  # (1, 13)
    mask = torch.cat([torch.ones(1, 9), torch.zeros(1, 4)], dim=1).long()
    torch.testing.assert_close(enc(padded, mask)[:, :9], out, rtol=1e-5, atol=1e-5)


def test_encoder_layer_names():
    enc = TextEncoder(**encoder.SIZES["tiny"])
    linears = {n for n, m in enc.named_modules() if isinstance(m, nn.Linear)}
    assert linears == {f"blocks.{i}.{p}" for i in range(2) for p in PROJECTIONS}


@pytest.fixture
def tiny_dit():
    torch.manual_seed(0)
    return DiT(**backbone.SIZES["tiny"])


def test_dit_predicts_noise_shaped_like_latents(tiny_dit):
    x, t, cond = torch.randn(2, 4, 8, 8), torch.tensor([0.1, 0.9]), torch.randn(2, 5, 32)
    eps = tiny_dit(x, t, cond)  # (2, 4, 8, 8)
    assert eps.shape == x.shape and torch.isfinite(eps).all()
    assert not torch.allclose(tiny_dit(x, t.flip(0), cond), eps)  # time matters
    assert not torch.allclose(tiny_dit(x, t, cond + 1), eps)  # the conditioning matters
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    assert not torch.allclose(tiny_dit(x, t, cond, mask)[0], eps[0])


def test_dit_has_convolutions_and_named_linears(tiny_dit):
    convs = {n for n, m in tiny_dit.named_modules() if isinstance(m, nn.Conv2d)}
    linears = {n for n, m in tiny_dit.named_modules() if isinstance(m, nn.Linear)}
    assert convs == {"patch_embed", "refine"}
    for part in ("attn.qkv", "attn.proj", "cross.q", "cross.kv", "cross.proj", "mlp.fc", "mlp.proj", "ada"):
        assert f"blocks.1.{part}" in linears
    assert {"time.fc", "time.proj", "out"} <= linears


def test_dit_rejects_latents_of_another_size(tiny_dit):
    with pytest.raises(ValueError, match="latents"):
        tiny_dit(torch.randn(1, 4, 16, 16), torch.zeros(1), torch.randn(1, 3, 32))


def test_codec_round_trip_shapes_and_layers():
    torch.manual_seed(0)
    model = ConvCodec(**codec.SIZES["tiny"])
    img = torch.rand(2, 3, 32, 48) * 2 - 1
    lat = model.encode(img)  # (2, 4, 8, 12)
    assert lat.shape == (2, 4, 8, 12)
    out = model.decode(lat)  # (2, 3, 32, 48)
    assert out.shape == img.shape and out.abs().max() <= 1
    torch.testing.assert_close(model(img), out)
    kinds = {type(m) for m in model.modules()} - {ConvCodec}
    assert nn.Conv2d in kinds and nn.Upsample in kinds
    assert not any(isinstance(m, nn.ConvTranspose2d) for m in model.modules())
    assert [m.stride for n, m in model.named_modules() if n.startswith("encoder.down")] == [(2, 2), (2, 2)]
