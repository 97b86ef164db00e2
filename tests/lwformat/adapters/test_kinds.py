"""Each kind's output delta agrees with merging its dense delta into the base layer."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from lwformat.adapters import KINDS, AdapterHost, SlotSettings, geometry

LAYERS = {
    "linear": (lambda: nn.Linear(6, 5), lambda: torch.randn(3, 4, 6)),
    "linear_nobias": (lambda: nn.Linear(6, 5, bias=False), lambda: torch.randn(3, 6)),
    "gpt2_conv1d": (lambda: Conv1D(5, 6), lambda: torch.randn(2, 4, 6)),
    "conv1d": (lambda: nn.Conv1d(3, 5, 3, padding=1, stride=2), lambda: torch.randn(2, 3, 9)),
    "conv2d": (lambda: nn.Conv2d(3, 5, (3, 2), padding=1, dilation=(1, 2)), lambda: torch.randn(2, 3, 7, 6)),
    "embedding": (lambda: nn.Embedding(11, 5, padding_idx=0), lambda: torch.randint(0, 11, (2, 7))),
}


def merged_forward(layer: nn.Module, dW, db, x):
    W = layer.weight + (0 if dW is None else dW)
    b = getattr(layer, "bias", None)
    b = db if b is None else (b if db is None else b + db)
    if isinstance(layer, nn.Embedding):
        return F.embedding(x, W, padding_idx=layer.padding_idx)
    if isinstance(layer, Conv1D):
        return x @ W + b
    if isinstance(layer, nn.Linear):
        return F.linear(x, W, b)
    conv = F.conv1d if isinstance(layer, nn.Conv1d) else F.conv2d
    return conv(x, W, b, layer.stride, layer.padding, layer.dilation)


def host_with(kind: str, layer_name: str, seed: int = 0):
    torch.manual_seed(seed)
    make_layer, make_x = LAYERS[layer_name]
    layer, x = make_layer(), make_x()
    geo = geometry(layer)
    adapter = KINDS[kind](geo, SlotSettings(kind, rank=2, alpha=3.0, neurons=(0, 3)), layer)
    host = AdapterHost(layer, geo)
    host.add("a", adapter)
    return host, layer, adapter, x


CASES = [(k, layer) for k in KINDS for layer in LAYERS if geometry(LAYERS[layer][0]()).layer in KINDS[k].layers]


@pytest.mark.parametrize(("kind", "layer_name"), CASES)
def test_fresh_adapter_is_the_identity(kind, layer_name):
    host, layer, _, x = host_with(kind, layer_name)
    torch.testing.assert_close(host(x), layer(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize(("kind", "layer_name"), CASES)
def test_delta_equals_merged_weights(kind, layer_name):
    host, layer, adapter, x = host_with(kind, layer_name)
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    dW, db = adapter.delta_weight(layer)
    y_host = host(x)
    assert (y_host - layer(x)).abs().max() > 1e-3  # the adapter does something
    torch.testing.assert_close(y_host, merged_forward(layer, dW, db, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("kind", "layer_name"), CASES)
def test_weight_scales_the_delta_and_zero_is_exactly_base(kind, layer_name):
    host, layer, adapter, x = host_with(kind, layer_name)
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    full = host(x) - layer(x)
    adapter.mix_weight.fill_(0.25)
    torch.testing.assert_close(host(x) - layer(x), 0.25 * full, rtol=1e-4, atol=1e-6)
    adapter.mix_weight.fill_(0.0)
    assert torch.equal(host(x), layer(x))


def test_each_kind_declares_its_shapes():
    geo = geometry(nn.Conv2d(3, 5, 3))
    s = SlotSettings("x", rank=2, alpha=2, neurons=(1, 4))
    assert KINDS["lora"].shapes(geo, s) == {"lora_A": (2, 3, 3, 3), "lora_B": (5, 2)}
    assert KINDS["dora"].shapes(geo, s) == {"lora_A": (2, 3, 3, 3), "lora_B": (5, 2), "magnitude": (5,)}
    assert KINDS["ia3"].shapes(geo, s) == {"ia3_l": (5,)}
    assert KINDS["neuron"].shapes(geo, s) == {"neuron_delta": (2, 3, 3, 3)}
    assert KINDS["bias"].shapes(geo, s) == {"bias_delta": (5,)}


def test_rslora_scaling():
    assert SlotSettings("lora", rank=16, alpha=8).scaling == 0.5
    assert SlotSettings("lora", rank=16, alpha=8, rslora=True).scaling == 2.0


def test_neuron_delta_touches_only_its_neurons():
    host, layer, adapter, x = host_with("neuron", "linear")
    with torch.no_grad():
        adapter.neuron_delta.normal_()
    changed = (host(x) - layer(x)).abs().amax(dim=(0, 1)) > 0
    assert changed.nonzero().flatten().tolist() == [0, 3]


def test_host_reads_through_to_the_base_layer():
    host, layer, _, _ = host_with("lora", "linear")
    assert host.weight is layer.weight and host.in_features == 6


UNBATCHED = {  # a conv layer and one unbatched input (C, L) or (C, H, W), which nn.Conv1d/Conv2d take
    "conv1d": (lambda: nn.Conv1d(3, 5, 3, padding=1, stride=2), (3, 9)),
    "conv1d_out_rank_length_equal": (lambda: nn.Conv1d(3, 2, 3, padding=1), (3, 2)),  # was silently wrong, not an error
    "conv2d": (lambda: nn.Conv2d(3, 5, (3, 2), padding=1, dilation=(1, 2)), (3, 7, 6)),
}


@pytest.mark.parametrize("layer_name", UNBATCHED)
@pytest.mark.parametrize("kind", [k for k in KINDS if "conv1d" in KINDS[k].layers])
def test_unbatched_conv_input_is_one_sample_of_a_batch(kind, layer_name):
    torch.manual_seed(0)
    make_layer, shape = UNBATCHED[layer_name]
    layer, x = make_layer(), torch.randn(shape)
    geo = geometry(layer)
    adapter = KINDS[kind](geo, SlotSettings(kind, rank=2, alpha=3.0, neurons=(0, 1)), layer)
    host = AdapterHost(layer, geo)
    host.add("a", adapter)
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    y = host(x)
    assert torch.equal(y, host(x[None])[0])
    torch.testing.assert_close(y, merged_forward(layer, *adapter.delta_weight(layer), x), rtol=1e-5, atol=1e-5)


def test_adapters_inside_a_transformer_encoder_layer_count_in_eval_too(tmp_path):
    """In eval, nn.TransformerEncoderLayer's fast path reads linear1/linear2's weights itself:
    the adapters there were skipped, customized or applied, and eval disagreed with train."""
    from lwformat import LightConfig
    from lwformat.bundle import Bundle, write_bundle
    from lwformat.world import Block, World

    def world() -> World:
        torch.manual_seed(0)
        layer = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16, dropout=0.0, batch_first=True)
        return World.from_blocks({"a/b/c/enc": Block(nn.Sequential(layer), "llm")})

    x = torch.randn(2, 5, 8)  # (batch, tokens, d_model)
    trained = world()
    trained.customize(LightConfig(kind="lora", rank=2))
    with torch.no_grad():
        for p in trained.adapter_parameters():
            p.add_(torch.randn_like(p))
    applied = world()
    write_bundle(trained, tmp_path / "b", name="me/enc", version="1.0.0")
    applied.apply(Bundle.open(tmp_path / "b"))
    for w in (trained, applied):
        module = w.block("a/b/c/enc").module
        with torch.no_grad():
            slow = module.train()(x)  # training: no fast path, every host called
            fast = module.eval()(x)
        torch.testing.assert_close(fast, slow)
    with torch.no_grad():
        assert not torch.allclose(world().block("a/b/c/enc").module.eval()(x), fast)  # the adapters do change it


def test_adapters_in_a_transformer_encoder_take_its_padded_batches_in_eval():
    """In eval, nn.TransformerEncoder packs a batch with a padding mask into a nested tensor,
    which the hosts then received: a RuntimeError from the LoRA matmul."""
    import warnings

    from lwformat import LightConfig
    from lwformat.world import Block, World

    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16, dropout=0.0, batch_first=True)
    encoder = nn.TransformerEncoder(layer, 2)
    world = World.from_blocks({"a/b/c/enc": Block(encoder, "llm")})
    world.customize(LightConfig(kind="lora", rank=2))
    with torch.no_grad():
        for p in world.adapter_parameters():
            p.add_(torch.randn_like(p))
    x = torch.randn(2, 5, 8)  # (batch, tokens, d_model)
    pad = torch.zeros(2, 5, dtype=torch.bool)
    pad[1, 3:] = True  # the second sequence has 3 tokens
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch: nested tensors are a prototype
        packed = encoder.eval()(x, src_key_padding_mask=pad)
        padded = encoder.train()(x, src_key_padding_mask=pad)  # training: plain tensors, every host called
    torch.testing.assert_close(packed[0], padded[0])
    torch.testing.assert_close(packed[1, :3], padded[1, :3])


def test_dropout_leaves_an_embeddings_indices_alone():
    """Dropout on token indices failed in training (a float mask on a Long tensor); PEFT applies none there."""
    from lwformat import LightConfig
    from lwformat.world import Block, World

    world = World.from_blocks({"a/b/c/lm": Block(nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8)), "llm")})
    world.customize(LightConfig(kind="lora", rank=2, dropout=0.5))
    with torch.no_grad():
        for p in world.adapter_parameters():
            p.add_(torch.randn_like(p))  # the embedding's A starts at zero: make its delta count
    module = world.block("a/b/c/lm").module.train()
    tokens = torch.randint(0, 10, (2, 6))
    embedded = module[0](tokens)  # (2, 6, 8): no mask here, so the same twice
    torch.testing.assert_close(module[0](tokens), embedded)
    assert module(tokens).shape == (2, 6, 8)
