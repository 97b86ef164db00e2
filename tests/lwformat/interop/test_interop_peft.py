"""PEFT adapter directories: import into a block, export back, and PEFT itself as the judge."""

from __future__ import annotations

import copy
import json
import math

import peft  # noqa: F401  (a test dependency: fail loudly if missing)
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from safetensors.torch import load_file, save_file
from torch import nn

from lwformat import Block, LightConfig, World
from lwformat.errors import InteropError
from lwformat.interop import export_peft, import_peft

PATH = "author/narrate/text/llm"


class MLP(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.up = nn.Linear(dim, 2 * dim)
        self.down = nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.tanh(self.up(x)))


class Tiny(nn.Module):
    """Embedding, nested Linears, Conv1d and Conv2d: every layer kind both sides support."""

    def __init__(self, vocab: int = 11, dim: int = 8) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList([MLP(dim), MLP(dim)])
        self.mix = nn.Conv1d(dim, dim, 3, padding=1)
        self.img = nn.Conv2d(2, 2, 3, padding=1)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.emb(tokens)  # (B, T, D)
        for block in self.blocks:
            h = h + block(h)  # (B, T, D)
        h = self.mix(h.transpose(1, 2)).transpose(1, 2)  # (B, T, D)
        B, T, D = h.shape
        h = self.img(h.reshape(B, 2, T, D // 2)).reshape(B, T, D)  # (B, 2, T, D/2) -> (B, T, D)
        return self.head(h)  # (B, T, V)


LINEAR = ["blocks.0.up", "blocks.0.down", "blocks.1.up", "blocks.1.down", "mix", "img"]


def make_peft(base: nn.Module, tmp_path, *, dora: bool, rslora: bool, seed: int = 1):
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=LINEAR + ([] if dora else ["emb"]),
        rank_pattern={"blocks.1.down": 2, "img": 1},
        alpha_pattern={"mix": 3.0, r"blocks\.0\.up": 5},
        use_dora=dora,
        use_rslora=rslora,
    )
    model = get_peft_model(copy.deepcopy(base), config)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:  # B too, so that every adapter changes the output
                p.add_(0.3 * torch.randn_like(p))
    model.eval()
    out = tmp_path / "peft"
    model.save_pretrained(out)
    return model, out


@pytest.fixture
def base() -> nn.Module:
    torch.manual_seed(0)
    return Tiny().eval()


def world_of(base: nn.Module) -> World:
    return World.from_blocks({PATH: Block(copy.deepcopy(base), "llm")})


TOKENS = torch.randint(0, 11, (3, 6), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize(("dora", "rslora"), [(False, False), (False, True), (True, False), (True, True)])
def test_import_matches_peft_and_export_loads_in_peft_bit_exactly(base, tmp_path, dora, rslora):
    model, saved = make_peft(base, tmp_path, dora=dora, rslora=rslora)
    world = world_of(base)
    plan = import_peft(world, PATH, saved)
    assert {s.module_path for s in plan.slots} == set(LINEAR + ([] if dora else ["emb"]))
    ranks = {s.module_path: (s.rank, s.alpha) for s in plan.slots}
    assert ranks["blocks.1.down"] == (2, 8.0) and ranks["img"] == (1, 8.0)
    assert ranks["mix"] == (4, 3.0) and ranks["blocks.0.up"] == (4, 5.0) and ranks["blocks.1.up"] == (4, 8.0)
    with torch.no_grad():
        expected = model(TOKENS)
        torch.testing.assert_close(world.block(PATH)(TOKENS), expected, atol=1e-5, rtol=1e-5)

    export_peft(world, PATH, tmp_path / "out")
    original, exported = load_file(saved / "adapter_model.safetensors"), load_file(tmp_path / "out/adapter_model.safetensors")
    assert original.keys() == exported.keys()
    for key, t in original.items():  # lossless: same dtype, shape and bits
        assert exported[key].dtype == t.dtype and torch.equal(exported[key], t), key
    reloaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "out").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(TOKENS), expected, atol=1e-5, rtol=1e-5)


def test_export_of_our_own_customization_loads_in_peft(base, tmp_path):
    world = world_of(base)
    world.customize(LightConfig(rank=3, alpha=6, slots=["blocks.*.up", "head"], rank_pattern={"head": 2}))
    torch.manual_seed(3)
    with torch.no_grad():
        for p in world.adapter_parameters():
            p.add_(0.2 * torch.randn_like(p))
    export_peft(world, PATH, tmp_path / "out")
    config = json.loads((tmp_path / "out/adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["use_dora"]) == (3, 6, False)
    reloaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "out").eval()
    targeted = sorted(n.removeprefix("base_model.model.") for n, m in reloaded.named_modules() if hasattr(m, "lora_A") and m.lora_A)
    assert targeted == ["blocks.0.up", "blocks.1.up", "head"]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(TOKENS), world.block(PATH)(TOKENS), atol=1e-5, rtol=1e-5)


def test_targets_are_exact_when_a_name_is_a_suffix_of_another(tmp_path):
    class Nested(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.inner = nn.Module()
            self.inner.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.inner.fc(self.fc(x))

    torch.manual_seed(0)
    base = Nested()
    world = World.from_blocks({PATH: Block(copy.deepcopy(base), "llm")})
    world.customize(LightConfig(rank=2, slots=[f"{PATH}:fc"]))  # "fc" only, not "inner.fc": the full form is exact
    export_peft(world, PATH, tmp_path / "out")
    reloaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "out")
    assert [n for n, m in reloaded.named_modules() if hasattr(m, "lora_A") and m.lora_A] == ["base_model.model.fc"]


def test_an_import_adapts_exactly_its_modules_when_a_name_is_a_suffix_of_another(tmp_path):
    """A slot pattern "fc" matches "inner.fc" too (PEFT's suffix rule): the config an import
    builds must still name "fc" alone, and give "inner.down" its own rank."""

    class Nested(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.inner = MLP(4)
            self.inner.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.inner(self.inner.fc(self.fc(x)))

    torch.manual_seed(0)
    base = Nested()
    config = LoraConfig(r=2, lora_alpha=4, target_modules=r"fc|inner\.down|inner\.up", rank_pattern={"^fc": 1, "up": 1},
                        init_lora_weights=False)  # fmt: skip
    model = get_peft_model(copy.deepcopy(base), config).eval()
    model.save_pretrained(tmp_path / "peft")
    world = World.from_blocks({PATH: Block(copy.deepcopy(base), "llm")})
    plan = import_peft(world, PATH, tmp_path / "peft")
    assert {s.module_path: s.rank for s in plan.slots} == {"fc": 1, "inner.up": 1, "inner.down": 2}
    x = torch.randn(3, 4)
    with torch.no_grad():
        torch.testing.assert_close(world.block(PATH)(x), model(x), atol=1e-6, rtol=1e-6)


def rewrite(saved, change):
    tensors = load_file(saved / "adapter_model.safetensors")
    change(tensors)
    save_file(tensors, saved / "adapter_model.safetensors")


def test_refusals_leave_the_world_untouched(base, tmp_path):
    _, saved = make_peft(base, tmp_path, dora=True, rslora=False)
    world = world_of(base)
    before = world.digests()

    rewrite(saved, lambda t: t.update({"base_model.model.mix.lora_magnitude_vector": torch.ones(8)}))
    with pytest.raises(InteropError, match=r"mix.lora_magnitude_vector: shape \(8,\), this conv1d layer needs \(1, 8, 1\)"):
        import_peft(world, PATH, saved)

    rewrite(saved, lambda t: t.update({"base_model.model.mix.lora_magnitude_vector": torch.ones(1, 8, 1)}))
    rewrite(saved, lambda t: t.update({"base_model.model.mix.weird": torch.ones(2)}))
    with pytest.raises(InteropError, match="mix.weird: not a PEFT LoRA/DoRA tensor key"):
        import_peft(world, PATH, saved)

    rewrite(saved, lambda t: t.pop("base_model.model.mix.weird") is not None and t.update(
        {"base_model.model.nowhere.lora_A.weight": torch.ones(4, 8)}))  # fmt: skip
    with pytest.raises(InteropError, match="module 'nowhere' .*no such module"):
        import_peft(world, PATH, saved)

    assert world.customization is None and world.digests() == before
    assert all(p.requires_grad for p in world.parameters())


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_nan_or_inf_in_a_tensor_or_an_alpha_is_refused_naming_the_key(base, tmp_path, value):
    _, saved = make_peft(base, tmp_path, dora=False, rslora=False)
    world = world_of(base)
    before = world.digests()
    key = "base_model.model.blocks.0.up.lora_B.weight"
    rewrite(saved, lambda t: t[key].view(-1).__setitem__(3, value))
    with pytest.raises(InteropError, match="NaN or inf") as info:
        import_peft(world, PATH, saved)
    assert info.value.path == key
    rewrite(saved, lambda t: t[key].view(-1).__setitem__(3, 0.0))
    config = json.loads((saved / "adapter_config.json").read_text())
    for field, change in (("lora_alpha", {"lora_alpha": value}), ("alpha_pattern['mix']", {"alpha_pattern": {"mix": value}})):
        (saved / "adapter_config.json").write_text(json.dumps(config | change))  # Python's json writes and reads NaN
        with pytest.raises(InteropError, match="not a finite number") as info:
            import_peft(world, PATH, saved)
        assert info.value.path == field
    assert world.customization is None and world.digests() == before


def test_a_module_that_is_not_a_slot_is_refused(base, tmp_path):
    _, saved = make_peft(base, tmp_path, dora=False, rslora=False)
    rewrite(saved, lambda t: t.update({"base_model.model.blocks.0.lora_A.weight": torch.ones(4, 8)}))
    with pytest.raises(InteropError, match="MLP is not a slot"):
        import_peft(world_of(base), PATH, saved)


def test_dora_on_an_embedding_is_refused(base, tmp_path):
    _, saved = make_peft(base, tmp_path, dora=True, rslora=False)
    emb = {"base_model.model.emb.lora_embedding_A": torch.ones(4, 11), "base_model.model.emb.lora_embedding_B": torch.ones(8, 4)}
    rewrite(saved, lambda t: t.update(emb))
    with pytest.raises(InteropError, match="dora does not support embedding"):
        import_peft(world_of(base), PATH, saved)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"peft_type": "IA3"}, "only LORA"),
        ({"modules_to_save": ["head"]}, "modules_to_save"),
        ({"bias": "all"}, "bias='all'"),
        ({"init_lora_weights": "pissa"}, "changes the base weights"),
        ({"r": 5, "rank_pattern": {}}, "the config says 5"),
    ],
)
def test_unsupported_configs_are_refused(base, tmp_path, change, message):
    _, saved = make_peft(base, tmp_path, dora=False, rslora=False)
    config = json.loads((saved / "adapter_config.json").read_text())
    (saved / "adapter_config.json").write_text(json.dumps(config | change))
    world = world_of(base)
    with pytest.raises(InteropError, match=message):
        import_peft(world, PATH, saved)
    assert world.customization is None


@pytest.mark.parametrize(
    ("change", "path"),
    [
        ({"lora_alpha": "x"}, "lora_alpha"),
        ({"lora_alpha": None}, "lora_alpha"),
        ({"r": "4"}, "r"),
        ({"rank_pattern": ["blocks.1.down"]}, "rank_pattern"),
        ({"rank_pattern": {"img": 0}}, "rank_pattern['img']"),
        ({"alpha_pattern": {"mix": "x"}}, "alpha_pattern['mix']"),
    ],
)
def test_malformed_config_values_are_interop_errors_naming_the_field(base, tmp_path, change, path):
    _, saved = make_peft(base, tmp_path, dora=False, rslora=False)
    config = json.loads((saved / "adapter_config.json").read_text())
    (saved / "adapter_config.json").write_text(json.dumps(config | change))
    world = world_of(base)
    with pytest.raises(InteropError) as info:
        import_peft(world, PATH, saved)
    assert info.value.path == path
    assert world.customization is None


def test_a_lora_A_without_dimensions_is_an_interop_error(base, tmp_path):
    _, saved = make_peft(base, tmp_path, dora=False, rslora=False)
    key = "base_model.model.blocks.0.up.lora_A.weight"
    rewrite(saved, lambda t: t.update({key: torch.tensor(1.0)}))
    with pytest.raises(InteropError, match=r"shape \(\)") as info:
        import_peft(world_of(base), PATH, saved)
    assert info.value.path == key


def test_a_rank_above_the_layers_smaller_side_is_an_interop_error(base, tmp_path):
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=12, lora_alpha=8, target_modules=["blocks.0.up"]))  # Linear(8, 16)
    model.save_pretrained(tmp_path / "peft")
    PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft")(TOKENS)  # PEFT loads and runs it
    world = world_of(base)
    with pytest.raises(InteropError, match=r"rank 12 is above min\(in, out\) = 8") as info:
        import_peft(world, PATH, tmp_path / "peft")
    assert info.value.path == "base_model.model.blocks.0.up.lora_A.weight" and world.customization is None


def test_a_pickled_adapter_is_never_loaded(base, tmp_path):
    _, saved = make_peft(base, tmp_path, dora=False, rslora=False)
    (saved / "adapter_model.safetensors").rename(saved / "adapter_model.bin")
    with pytest.raises(InteropError, match="never loaded"):
        import_peft(world_of(base), PATH, saved)


def test_export_refuses_kinds_peft_cannot_hold(base, tmp_path):
    world = world_of(base)
    with pytest.raises(InteropError, match="no adapters"):
        export_peft(world, PATH, tmp_path / "out")
    world.customize(LightConfig(kind="ia3", slots=["head"]))
    with pytest.raises(InteropError, match=r"\['ia3'\]"):
        export_peft(world, PATH, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def customized(base: nn.Module, rank: int) -> World:
    world = world_of(base)
    world.customize(LightConfig(rank=rank, alpha=rank, slots=["blocks.0.up"]))
    return world


def test_export_overwrites_an_adapter_directory_as_save_pretrained_does(base, tmp_path):
    out = tmp_path / "out"
    export_peft(customized(base, 2), PATH, out)
    (out / "README.md").write_text("mine")
    world = customized(base, 4)
    export_peft(world, PATH, out)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4
    reloaded = PeftModel.from_pretrained(copy.deepcopy(base), out).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(TOKENS), world.block(PATH)(TOKENS), atol=1e-5, rtol=1e-5)


def test_a_failed_export_changes_nothing_and_is_an_interop_error(base, tmp_path):
    out = tmp_path / "out"
    export_peft(customized(base, 2), PATH, out)
    weights = (out / "adapter_model.safetensors").read_bytes()
    (out / "adapter_config.json").unlink()
    (out / "adapter_config.json").mkdir()  # the weights can be replaced, the config cannot
    with pytest.raises(InteropError, match="cannot write") as info:
        export_peft(customized(base, 4), PATH, out)
    assert info.value.path == str(out)
    assert (out / "adapter_model.safetensors").read_bytes() == weights  # the old adapter's, not half of the new one
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]  # no leftovers
    with pytest.raises(InteropError, match="cannot write"):
        export_peft(customized(base, 4), PATH, out / "adapter_model.safetensors" / "sub")  # a path beneath a file


def test_gpt2_conv1d_layers_round_trip(tmp_path):
    # GPT-2 stores Linear weights transposed (transformers' Conv1D): PEFT's fan_in_fan_out case.
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(0)
    base = GPT2Model(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=16)).eval()
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)
    model = get_peft_model(copy.deepcopy(base), config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(0.3 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "peft")
    world = World.from_blocks({PATH: Block(copy.deepcopy(base), "llm")})
    plan = import_peft(world, PATH, tmp_path / "peft")
    assert {s.layer for s in plan.slots} == {"gpt2_conv1d"} and len(plan.slots) == 3
    ids = torch.randint(0, 50, (2, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model.eval()(ids).last_hidden_state
        torch.testing.assert_close(world.block(PATH)(ids).last_hidden_state, expected, atol=1e-5, rtol=1e-5)
    export_peft(world, PATH, tmp_path / "out")
    reloaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "out").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).last_hidden_state, expected, atol=1e-5, rtol=1e-5)


def test_an_imported_adapter_ships_as_a_signed_bundle(base, tmp_path):
    from lwformat.bundle import keys, signing
    from lwformat.bundle.read import Bundle
    from lwformat.bundle.verify import verify
    from lwformat.bundle.write import write_bundle

    _, saved = make_peft(base, tmp_path, dora=True, rslora=False)
    world = world_of(base)
    import_peft(world, PATH, saved)
    write_bundle(world, tmp_path / "bundle", name="community/tiny-dora", version="0.1.0")
    private, public = keys.generate_keypair(tmp_path)
    signing.sign_bundle(tmp_path / "bundle", private)
    original = load_file(saved / "adapter_model.safetensors")
    with Bundle.open(tmp_path / "bundle") as bundle:
        assert verify(bundle, public)
        lora_B = bundle.slot_tensors(f"{PATH}:mix")["lora_B"]  # (out, r): PEFT's (out, r, 1) without the 1
        assert torch.equal(lora_B, original["base_model.model.mix.lora_B.weight"].squeeze(-1))


def test_a_block_wrapping_a_hugging_face_model_trades_adapters_with_peft_on_that_model(tmp_path):
    """The zoo's MiniLM block holds the BertModel as `.model`: root="model" names adapters as PEFT does on it."""
    from transformers import BertModel

    from lwformat.zoo import minilm_block, minilm_tokenize
    from lwformat.zoo.hf import minilm_dir

    path = "philosopher/reflect/ideas/conditioner"
    world = World.from_blocks({path: minilm_block()})
    world.customize(LightConfig(kind="lora", rank=4, alpha=8, slots=["*.query", "*.value"]))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in world.adapter_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    ids, mask = minilm_tokenize(["Rain fell on the neon sign.", "The detective lit a cigarette."])
    with torch.no_grad():
        ours = world.block(path)(ids, attention_mask=mask)
    export_peft(world, path, tmp_path / "out", root="model")
    plain = BertModel.from_pretrained(minilm_dir(), add_pooling_layer=False, local_files_only=True, dtype=torch.float32).eval()
    theirs_model = PeftModel.from_pretrained(plain, tmp_path / "out").eval()
    with torch.no_grad():
        theirs = theirs_model(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    theirs_model.save_pretrained(tmp_path / "back")  # and PEFT's own files come back in
    again = World.from_blocks({path: minilm_block()})
    import_peft(again, path, tmp_path / "back", root="model")
    with torch.no_grad():
        assert torch.equal(again.block(path)(ids, attention_mask=mask), ours)


def test_an_export_under_a_root_names_the_adapters_it_leaves_out(tmp_path):
    """PEFT loads the adapter on the model at `root`; adapters elsewhere in the block cannot go along."""
    world = World.from_blocks({PATH: Block(Tiny(), "llm")})
    world.customize(LightConfig(kind="lora", rank=2, alpha=4, slots=["blocks.*.up"]))
    with pytest.warns(UserWarning, match=r"1 adapters outside blocks\.0 are not written \(first: blocks\.1\.up\)"):
        export_peft(world, PATH, tmp_path / "out", root="blocks.0")
    assert sorted(load_file(tmp_path / "out" / "adapter_model.safetensors")) == [
        "base_model.model.up.lora_A.weight", "base_model.model.up.lora_B.weight",
    ]  # fmt: skip
