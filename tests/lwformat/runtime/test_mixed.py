"""Mixed-world batches: sample i runs exactly as a world with only bundles[i] applied."""

import pytest
import torch

from lwformat.errors import NotAppliedError, TargetError
from lwformat.zoo import reference_world
from tests.lwformat.runtime.conftest import tokens

KEYS = ("author.logits", "environment.logits", "creator.image")


def alone(bundle, weight, x):
    world = reference_world("tiny", seed=0)
    if bundle is not None:
        world.apply(bundle, weight=weight)
    with torch.no_grad():
        return world({"tokens": x})


def test_each_sample_gets_its_own_world(world, bundles):
    chosen = {"author/noir": (bundles["noir"], 0.7), "author/rain": (bundles["rain"], 1.0),
              "author/small": (bundles["small"], 0.5), "creator/ink": (bundles["creator"], 1.0)}  # fmt: skip
    for name, (bundle, weight) in chosen.items():
        world.apply(bundle, weight=weight)
    picks = ["author/noir", None, "author/rain", "author/small", "creator/ink", "author/noir"]
    x = tokens(batch=len(picks))
    with torch.no_grad():
        mixed = world.run({"tokens": x}, picks)
    for i, name in enumerate(picks):
        bundle, weight = chosen[name] if name else (None, 0)
        expected = alone(bundle, weight, x[i : i + 1])
        for key in KEYS:
            torch.testing.assert_close(mixed[key][i : i + 1], expected[key], rtol=1e-5, atol=1e-5)


def test_a_mixed_batch_under_autocast_keeps_the_dtypes(world, bundles):
    world.apply(bundles["noir"], weight=0.7)
    world.apply(bundles["creator"])
    picks = ["author/noir", None, "creator/ink"]
    x = tokens(batch=len(picks))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        base = reference_world("tiny", seed=0)({"tokens": x})
        mixed = world.run({"tokens": x}, picks)
    with torch.no_grad():
        exact = world.run({"tokens": x}, picks)
    for key in KEYS:
        assert mixed[key].dtype == base[key].dtype, key
        torch.testing.assert_close(mixed[key].float(), exact[key], rtol=0, atol=0.1)  # bfloat16 matmuls


def test_weights_and_swaps_inside_a_routed_block_take_effect(world, bundles):
    """Routes are sorted out when the block opens; they hold the adapters' own tensors."""
    world.apply(bundles["noir"], weight=0.7, name="author/a")
    world.apply(bundles["rain"], weight=1.0, name="author/b")
    picks = ["author/a", None, "author/b"]
    x = tokens(batch=len(picks))
    with torch.no_grad(), world.routed(picks):
        world.set_weight("author/a", 0.2)
        world.swap("author/b", bundles["noir2"])
        mixed = world({"tokens": x})
    for i, (bundle, weight) in enumerate([(bundles["noir"], 0.2), (None, 0), (bundles["noir2"], 1.0)]):
        expected = alone(bundle, weight, x[i : i + 1])
        for key in KEYS:
            torch.testing.assert_close(mixed[key][i : i + 1], expected[key], rtol=1e-5, atol=1e-5)


def test_hosts_are_left_unrouted_and_the_stack_unchanged(world, bundles):
    world.apply(bundles["noir"], weight=0.7)
    world.apply(bundles["rain"], weight=0.3)
    x = tokens()
    with torch.no_grad():
        stacked = world({"tokens": x})
        world.run({"tokens": x}, ["author/noir", None, "author/rain"])
        again = world({"tokens": x})
    assert all(torch.equal(stacked[k], again[k]) for k in KEYS)


def test_bad_requests(world, bundles):
    world.apply(bundles["noir"])
    with pytest.raises(NotAppliedError):
        world.run({"tokens": tokens()}, ["author/noir", "author/ghost", None])
    with pytest.raises(TargetError, match="batch size 3"):
        world.run({"tokens": tokens()}, ["author/noir", None])


def test_a_mixed_batch_on_a_customized_world_says_what_to_do(world, bundles):
    from lwformat import LightConfig
    from lwformat.errors import RuntimeStateError

    world.customize(LightConfig(kind="lora", rank=2, blocks=["creator/**"]))
    world.apply(bundles["noir"])
    with pytest.raises(RuntimeStateError, match="write_bundle"):
        world.run({"tokens": tokens(batch=2)}, ["author/noir", None])


def test_a_small_scaling_on_a_half_world_overflows_in_no_sample(tmp_path):
    """Large factors with a tiny alpha/r are finite applied alone; the mixed path must scale before the
    up-projection as the plain one does, and give samples that picked nothing exactly the base."""
    from lwformat import LightConfig
    from lwformat.bundle.read import Bundle
    from lwformat.bundle.write import write_bundle
    from tests.lwformat.runtime.conftest import LM

    trained = reference_world("tiny", seed=0)
    trained.customize(LightConfig(kind="lora", rank=4, alpha=0.001, blocks=[LM], slots=["blocks.*.mlp.fc"]))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in trained.adapter_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 100)
    write_bundle(trained, tmp_path / "big", name="author/big", version="1.0.0")
    big = Bundle.open(tmp_path / "big")
    x = tokens()
    base = reference_world("tiny", seed=0).half()
    alone = reference_world("tiny", seed=0)
    alone.apply(big)
    world = reference_world("tiny", seed=0)
    world.apply(big)
    alone.half(), world.half()
    with torch.no_grad():
        expected, plain, mixed = alone({"tokens": x}), base({"tokens": x}), world.run({"tokens": x}, ["author/big", None, None])
    for key in KEYS:
        assert mixed[key].isfinite().all() and expected[key].isfinite().all(), key
        torch.testing.assert_close(mixed[key][:1], expected[key][:1], rtol=1e-2, atol=1e-2)
        assert torch.equal(mixed[key][1:], plain[key][1:]), key


def test_inside_a_mixed_batch_fusing_and_nesting_are_refused_and_the_routes_hold(world, bundles):
    """Fusing there would give every sample the sum of all bundles; a nested batch, on leaving,
    ended the outer one's routes, so the outer samples silently got the whole stack."""
    from lwformat.errors import RuntimeStateError

    world.apply(bundles["noir"], weight=0.7)
    world.apply(bundles["rain"])
    picks = ["author/noir", None, "author/rain"]
    x = tokens()
    with torch.no_grad():
        expected = world.run({"tokens": x}, picks)
        with world.routed(picks):
            with pytest.raises(RuntimeStateError, match="inside a mixed batch"):
                world.fuse()
            with pytest.raises(RuntimeStateError, match="do not nest"), world.routed(picks):
                pass
            with pytest.raises(RuntimeStateError, match="do not nest"):
                world.run({"tokens": x}, picks)
            got = world({"tokens": x})
    assert world.fused_state is None and world.routes_open == 0
    assert all(torch.equal(got[k], expected[k]) for k in KEYS)


ENCODER = "philosopher/reflect/ideas/conditioner"


def encoder_world(*, batch_first: bool = True, stacked: bool = True):
    from torch import nn

    from lwformat.world import Block, World

    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=batch_first)
    module = nn.TransformerEncoder(layer, 2, enable_nested_tensor=batch_first) if stacked else layer
    return World.from_blocks({ENCODER: Block(module, "conditioner")})


def encoder_bundles(root, **kwargs) -> dict:
    from lwformat import LightConfig
    from lwformat.bundle.read import Bundle
    from lwformat.bundle.write import write_bundle

    out = {}
    for seed, name in enumerate(["author/a", "author/b"]):
        trained = encoder_world(**kwargs)
        torch.manual_seed(10 + seed)
        trained.customize(LightConfig(kind="lora", rank=2, slots=["*linear1", "*linear2"]))
        with torch.no_grad():
            for p in trained.adapter_parameters():
                p.add_(torch.randn_like(p) * 0.3)
        write_bundle(trained, root / str(seed), name=name, version="1.0.0")
        out[name] = Bundle.open(root / str(seed))
    return out


def _padded(y: torch.Tensor) -> torch.Tensor:
    return y.to_padded_tensor(0.0) if y.is_nested else y


@pytest.mark.parametrize("lengths", [(3, 3, 3), (5, 4, 5), (2, 3, 1)])  # as many tokens as samples; more; fewer
def test_a_padded_batch_packed_by_a_transformer_encoder_gives_each_sequence_its_own_bundle(tmp_path, lengths):
    """In eval nn.TransformerEncoder packs a padded batch into a nested tensor; each host took the
    sequences one at a time but applied the whole batch's selection along each one's tokens:
    wrong outputs when a sequence had as many tokens as the batch samples, a LayoutError otherwise."""
    import warnings

    bundles = encoder_bundles(tmp_path)
    world = encoder_world().eval()
    for bundle in bundles.values():
        world.apply(bundle)
    picks = ["author/a", None, "author/b"]
    x = torch.randn(3, max(lengths) + 1, 16, generator=torch.Generator().manual_seed(0))  # (B, T, E)
    pad = torch.arange(x.shape[1])[None, :] >= torch.tensor(lengths)[:, None]  # (B, T) True past each length
    encoder = world.block(ENCODER).module
    seen = []  # whether the hosts got the packed batch, which this is about
    encoder.layers[0].linear1.register_forward_pre_hook(lambda module, args: seen.append(args[0].is_nested))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch: nested tensors are a prototype
        with world.routed(picks):
            mixed = encoder(x, src_key_padding_mask=pad)  # (B, T, E), padded again on the way out
        assert seen == [True]
        for i, name in enumerate(picks):
            alone = encoder_world().eval()
            if name is not None:
                alone.apply(bundles[name])
            expected = _padded(alone.block(ENCODER).module(x[i : i + 1], src_key_padding_mask=pad[i : i + 1]))
            n = lengths[i]
            torch.testing.assert_close(mixed[i, :n], expected[0, :n], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tokens_first", [3, 5])  # as many tokens as samples (it ran, routing by token); more
def test_a_mixed_batch_through_a_sequence_first_layer_is_refused_before_it_starts(tmp_path, tokens_first):
    """A layer inside nn.TransformerEncoderLayer(batch_first=False) gets (T, B, E): the routes, which
    select along dim 0, selected by token position, silently when T == B. A documented limit, refused up front."""
    from lwformat.errors import LayoutError

    bundles = encoder_bundles(tmp_path, batch_first=False, stacked=False)
    world = encoder_world(batch_first=False, stacked=False)
    for bundle in bundles.values():
        world.apply(bundle)
    x = torch.randn(tokens_first, 3, 16, generator=torch.Generator().manual_seed(0))  # (T, B, E)
    layer = world.block(ENCODER).module
    with torch.no_grad():
        stacked = layer(x)
        with pytest.raises(LayoutError, match="sequence-first .*a documented limit") as caught, world.routed(["author/a", None, "author/b"]):
            layer(x)
        assert caught.value.path == ENCODER  # the block's root module is the layer
        assert world.routes_open == 0 and all(host.route is None for host in (layer.linear1, layer.linear2))
        assert torch.equal(layer(x), stacked)
        with world.routed([None, None, None]):  # no sample routes a layer there: nothing to mix up
            torch.testing.assert_close(layer(x), encoder_world(batch_first=False, stacked=False).block(ENCODER).module(x))


def test_the_refusal_names_the_innermost_sequence_first_module(tmp_path):
    """nn.Transformer(batch_first=False) says so itself, and so does each of its layers (on its self_attn)."""
    from torch import nn

    from lwformat import LightConfig
    from lwformat.bundle.read import Bundle
    from lwformat.bundle.write import write_bundle
    from lwformat.errors import LayoutError
    from lwformat.world import Block, World

    def transformer_world():
        torch.manual_seed(0)
        model = nn.Transformer(8, 2, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=16, dropout=0.0)
        return World.from_blocks({ENCODER: Block(model, "conditioner")})

    trained = transformer_world()
    trained.customize(LightConfig(kind="lora", rank=2, slots=["encoder.layers.0.linear1"]))
    write_bundle(trained, tmp_path / "b", name="author/a", version="1.0.0")
    world = transformer_world()
    world.apply(Bundle.open(tmp_path / "b"))
    with pytest.raises(LayoutError) as caught, world.routed(["author/a", None]):
        pass
    assert caught.value.path == f"{ENCODER}:encoder.layers.0"
    assert world.routes_open == 0


def test_a_layer_that_transposes_around_a_default_attention_runs_a_mixed_batch(tmp_path):
    """A custom layer (DETR, fairseq style) transposes around an nn.MultiheadAttention left at its
    default batch_first=False while its own fc1/fc2 get the batch first. Its self_attn says nothing of
    their layout, yet any module's self_attn marked it sequence-first and the mixed batch was refused."""
    from torch import nn

    from lwformat import LightConfig
    from lwformat.bundle.read import Bundle
    from lwformat.bundle.write import write_bundle
    from lwformat.world import Block, World

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.self_attn = nn.MultiheadAttention(16, 2)  # batch_first=False, torch's default
            self.fc1 = nn.Linear(16, 32)
            self.fc2 = nn.Linear(32, 16)

        def forward(self, x):  # x: (B, T, E)
            t = x.transpose(0, 1)  # (T, B, E)
            a = self.self_attn(t, t, t, need_weights=False)[0].transpose(0, 1)  # (B, T, E)
            return x + self.fc2(torch.relu(self.fc1(x + a)))  # (B, T, E)

    def layer_world():
        torch.manual_seed(0)
        return World.from_blocks({ENCODER: Block(Layer(), "conditioner")})

    bundles = {}
    for seed, name in enumerate(["author/a", "author/b"]):
        trained = layer_world()
        torch.manual_seed(10 + seed)
        trained.customize(LightConfig(rank=2, slots=["fc1", "fc2"]))
        with torch.no_grad():
            for p in trained.adapter_parameters():
                p.add_(torch.randn_like(p) * 0.3)
        write_bundle(trained, tmp_path / str(seed), name=name, version="1.0.0")
        bundles[name] = Bundle.open(tmp_path / str(seed))
    world = layer_world()
    for bundle in bundles.values():
        world.apply(bundle)
    picks = ["author/a", None, "author/b"]
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(0))  # (B, T, E)
    with torch.no_grad():
        with world.routed(picks):
            mixed = world.block(ENCODER).module(x)  # (B, T, E)
        for i, name in enumerate(picks):
            alone = layer_world()
            if name is not None:
                alone.apply(bundles[name])
            expected = alone.block(ENCODER).module(x[i : i + 1])  # (1, T, E)
            torch.testing.assert_close(mixed[i], expected[0], rtol=1e-5, atol=1e-5)
