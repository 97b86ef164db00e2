"""kohya-style LoRA files, written by hand with safetensors, imported into one block."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from lwformat import Block, World
from lwformat.errors import BundleLimitError, InteropError
from lwformat.interop import import_kohya

PATH = "creator/render/t2i/backbone"


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj_in = nn.Conv2d(4, 8, 3, padding=1)
        self.to_q = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj_in(x)  # (B, 8, H, W)
        return self.to_q(h.permute(0, 2, 3, 1))  # (B, H, W, 8)


class UNetish(nn.Module):
    """Module paths shaped like a diffusers UNet's, with underscores inside names."""

    def __init__(self) -> None:
        super().__init__()
        self.down_blocks = nn.ModuleList([nn.Module()])
        self.down_blocks[0].attentions = nn.ModuleList([Attention()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_blocks[0].attentions[0](x)


STEM = "lora_unet_down_blocks_0_attentions_0_"


def kohya_file(tmp_path, *, alpha_q: float | None = 1.5, extra: dict | None = None):
    g = torch.Generator().manual_seed(0)
    tensors = {
        STEM + "proj_in.lora_down.weight": torch.randn(2, 4, 3, 3, generator=g),  # (r, in, kh, kw)
        STEM + "proj_in.lora_up.weight": torch.randn(8, 2, 1, 1, generator=g),  # (out, r, 1, 1)
        STEM + "proj_in.alpha": torch.tensor(3.0),
        STEM + "to_q.lora_down.weight": torch.randn(4, 8, generator=g),  # (r, in)
        STEM + "to_q.lora_up.weight": torch.randn(8, 4, generator=g),  # (out, r)
        # a text encoder's module: another block's, left alone by the "lora_unet_" rule
        "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.randn(2, 5, generator=g),
        "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.randn(5, 2, generator=g),
    }
    if alpha_q is not None:
        tensors[STEM + "to_q.alpha"] = torch.tensor(alpha_q)
    tensors.update(extra or {})
    path = tmp_path / "style.safetensors"
    save_file(tensors, str(path))
    return path, tensors


@pytest.fixture
def unet() -> UNetish:
    torch.manual_seed(0)
    return UNetish()


def world_of(module: nn.Module) -> World:
    return World.from_blocks({PATH: Block(module, "backbone")})


def test_imported_layers_compute_w_x_plus_scaled_up_down(unet, tmp_path):
    file, t = kohya_file(tmp_path)
    attn = unet.down_blocks[0].attentions[0]
    W_in, b_in, W_q, b_q = (p.detach().clone() for p in (attn.proj_in.weight, attn.proj_in.bias, attn.to_q.weight, attn.to_q.bias))
    world = world_of(unet)
    plan = import_kohya(world, PATH, file, key_map="lora_unet_")
    assert {(s.module_path, s.rank, s.alpha) for s in plan.slots} == {
        ("down_blocks.0.attentions.0.proj_in", 2, 3.0),
        ("down_blocks.0.attentions.0.to_q", 4, 1.5),
    }
    x = torch.randn(2, 4, 5, 5, generator=torch.Generator().manual_seed(1))  # (B, in, H, W)
    down, up = t[STEM + "proj_in.lora_down.weight"], t[STEM + "proj_in.lora_up.weight"]
    expected = F.conv2d(x, W_in, b_in, padding=1) + (3.0 / 2) * F.conv2d(F.conv2d(x, down, padding=1), up)
    h = torch.randn(2, 5, 5, 8, generator=torch.Generator().manual_seed(2))  # (B, H, W, in)
    down, up = t[STEM + "to_q.lora_down.weight"], t[STEM + "to_q.lora_up.weight"]
    expected_q = h @ W_q.T + b_q + (1.5 / 4) * (h @ down.T @ up.T)
    with torch.no_grad():
        torch.testing.assert_close(attn.proj_in(x), expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(attn.to_q(h), expected_q, atol=1e-5, rtol=0)


def test_missing_alpha_means_alpha_equals_rank(unet, tmp_path):
    file, _ = kohya_file(tmp_path, alpha_q=None)
    plan = import_kohya(world_of(unet), PATH, file, key_map="lora_unet_")
    assert {s.module_path: s.alpha for s in plan.slots}["down_blocks.0.attentions.0.to_q"] == 4.0


def test_a_callable_key_map_picks_and_names_modules(unet, tmp_path):
    file, _ = kohya_file(tmp_path)

    def only_q(stem: str) -> str | None:
        return "down_blocks.0.attentions.0.to_q" if stem.endswith("_to_q") else None

    plan = import_kohya(world_of(unet), PATH, file, key_map=only_q)
    assert [s.module_path for s in plan.slots] == ["down_blocks.0.attentions.0.to_q"]


def test_unknown_parts_and_modules_are_refused(unet, tmp_path):
    world = world_of(unet)
    file, _ = kohya_file(tmp_path, extra={STEM + "to_q.dora_scale": torch.ones(1, 8)})
    with pytest.raises(InteropError, match="to_q.dora_scale: not a kohya LoRA key"):
        import_kohya(world, PATH, file, key_map="lora_unet_")
    file, _ = kohya_file(tmp_path, extra={STEM + "to_k.lora_down.weight": torch.ones(2, 8)})
    with pytest.raises(InteropError, match="to_k: no module of the block"):
        import_kohya(world, PATH, file, key_map="lora_unet_")
    with pytest.raises(InteropError, match="no key maps to a module"):
        import_kohya(world, PATH, kohya_file(tmp_path)[0], key_map="lora_vae_")
    file, _ = kohya_file(tmp_path, extra={STEM + "to_q.lora_up.weight": torch.ones(4, 8)})  # transposed
    with pytest.raises(InteropError, match=r"to_q.lora_up.weight: shape \(4, 8\), this linear layer needs \(8, 4\)"):
        import_kohya(world, PATH, file, key_map="lora_unet_")
    assert world.customization is None


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_nan_or_inf_in_a_tensor_or_an_alpha_is_refused_naming_the_key(unet, tmp_path, value):
    world = world_of(unet)
    for key, t in ((STEM + "to_q.lora_down.weight", torch.full((4, 8), value)), (STEM + "to_q.alpha", torch.tensor(value))):
        file, _ = kohya_file(tmp_path, extra={key: t})
        with pytest.raises(InteropError, match="NaN or inf") as info:
            import_kohya(world, PATH, file, key_map="lora_unet_")
        assert info.value.path == key
    assert world.customization is None


def test_values_beyond_the_adapters_dtype_are_refused_and_the_world_is_unchanged(tmp_path):
    """float64 values past float32's range into a float32 block's adapters (a half block's are float32 too)."""
    torch.manual_seed(0)
    world = world_of(UNetish())
    before = world.digests()
    file, _ = kohya_file(tmp_path, extra={STEM + "to_q.lora_down.weight": torch.full((4, 8), 1e39, dtype=torch.float64)})
    with pytest.raises(InteropError, match="beyond torch.float32") as info:
        import_kohya(world, PATH, file, key_map="lora_unet_")
    assert info.value.path == f"{PATH}:down_blocks.0.attentions.0.to_q"
    assert world.customization is None and world.digests() == before


def test_values_beyond_float16_import_into_a_half_blocks_float32_adapters(tmp_path):
    """A half block's adapters are float32, as PEFT keeps them: 1e5 (float16 tops at 65504) was refused."""
    torch.manual_seed(0)
    world = world_of(UNetish().half())
    file, _ = kohya_file(tmp_path, extra={STEM + "to_q.lora_down.weight": torch.full((4, 8), 1e5)})
    import_kohya(world, PATH, file, key_map="lora_unet_")
    params = world.adapter_parameters()
    assert {p.dtype for p in params} == {torch.float32} and any((p == 1e5).all() for p in params)


def test_a_lora_down_without_dimensions_is_an_interop_error(unet, tmp_path):
    key = STEM + "to_q.lora_down.weight"
    file, _ = kohya_file(tmp_path, extra={key: torch.tensor(1.0)})
    with pytest.raises(InteropError, match=r"shape \(\)") as info:
        import_kohya(world_of(unet), PATH, file, key_map="lora_unet_")
    assert info.value.path == key


def test_two_stems_mapped_to_one_module_are_refused_naming_both(unet, tmp_path):
    # SDXL-style text encoders lora_te1_/lora_te2_ stripped by one rule: both name to_q
    file, _ = kohya_file(tmp_path, extra={
        "lora_te2_to_q.lora_down.weight": torch.ones(4, 8), "lora_te2_to_q.lora_up.weight": torch.ones(8, 4),
    })  # fmt: skip
    to_q = "down_blocks.0.attentions.0.to_q"
    world = world_of(unet)
    with pytest.raises(InteropError, match="both") as info:
        import_kohya(world, PATH, file, key_map=lambda stem: to_q if stem.endswith("to_q") else None)
    assert f"'{STEM}to_q'" in str(info.value) and "'lora_te2_to_q'" in str(info.value)
    assert info.value.path == to_q and world.customization is None


def test_a_rank_above_the_layers_smaller_side_is_an_interop_error(unet, tmp_path):
    key = STEM + "to_q.lora_down.weight"  # to_q is Linear(8, 8)
    file, _ = kohya_file(tmp_path, extra={key: torch.ones(10, 8), STEM + "to_q.lora_up.weight": torch.ones(8, 10)})
    with pytest.raises(InteropError, match=r"rank 10 is above min\(in, out\) = 8") as info:
        import_kohya(world_of(unet), PATH, file, key_map="lora_unet_")
    assert info.value.path == key


def test_an_ambiguous_stem_is_refused(tmp_path):
    module = nn.Module()
    module.a_b = nn.Module()
    module.a_b.c = nn.Linear(4, 4)  # "a_b.c" -> "a_b_c"
    module.a = nn.Module()
    module.a.b_c = nn.Linear(4, 4)  # "a.b_c" -> "a_b_c" too
    save_file({"lora_unet_a_b_c.lora_down.weight": torch.ones(1, 4), "lora_unet_a_b_c.lora_up.weight": torch.ones(4, 1)}, str(tmp_path / "f.safetensors"))
    with pytest.raises(InteropError, match=r"ambiguous.*\['a_b.c', 'a.b_c'\]"):
        import_kohya(world_of(module), PATH, tmp_path / "f.safetensors", key_map="lora_unet_")
    plan = import_kohya(world_of(module), PATH, tmp_path / "f.safetensors", key_map=lambda stem: "a.b_c")
    assert [s.module_path for s in plan.slots] == ["a.b_c"]


def test_a_truncated_file_is_a_clear_error(unet, tmp_path):
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00")
    with pytest.raises(InteropError, match="not a safetensors file"):
        import_kohya(world_of(unet), PATH, tmp_path / "bad.safetensors", key_map="lora_unet_")
    (tmp_path / "huge.safetensors").write_bytes((1 << 40).to_bytes(8, "little") + b"{}")
    with pytest.raises(BundleLimitError, match="MAX_HEADER_BYTES"):
        import_kohya(world_of(unet), PATH, tmp_path / "huge.safetensors", key_map="lora_unet_")
