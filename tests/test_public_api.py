"""The public API is small and deliberate: pin every package's exports, sorted."""

import importlib

import pytest

PUBLIC = {
    "lwformat": ["Block", "Bundle", "Graph", "LWFormatError", "LightConfig", "Pipeline", "Plan", "Stage", "World",
                 "blend", "register_block", "register_flow", "write_bundle"],
    "lwformat.adapters": ["Adapter", "AdapterHost", "BiasDelta", "DoRA", "Geometry", "IA3", "KINDS", "LightConfig",
                          "LoRA", "NeuronDelta", "Plan", "SlotPlan", "SlotSettings", "geometry"],
    "lwformat.bundle": ["Bundle", "CompatReport", "Manifest", "check", "generate_keypair", "key_id", "load_private_key",
                        "load_public_key", "pack", "sign_bundle", "unpack", "verify", "verify_files",
                        "verify_signature", "write_bundle"],
    "lwformat.interop": ["export_peft", "import_kohya", "import_peft", "prefix_rule"],
    "lwformat.runtime": ["Applied", "Blend", "BlendReport", "SlotReport", "apply", "blend", "disabled", "fuse", "remove", "routed", "run",
                         "set_weight", "swap", "unfuse"],
    "lwformat.world": ["Block", "Graph", "Pipeline", "Stage", "World", "WorldSpec", "block_digest", "register_block",
                       "register_flow", "tensor_digest"],
    "lwhub": ["Client", "from_env", "pull"],
    "lwformat.zoo": ["ConvCodec", "DecoderLM", "DiT", "HFBert", "TextEncoder", "byte_tokens", "hf_block", "load_text",
                     "minilm_block", "minilm_tokenize", "reference_spec", "reference_world"],
}  # fmt: skip


@pytest.mark.parametrize("package", sorted(PUBLIC))
def test_exports_are_pinned_sorted_and_real(package):
    module = importlib.import_module(package)
    assert module.__all__ == PUBLIC[package]
    assert module.__all__ == sorted(module.__all__)
    assert all(hasattr(module, name) for name in module.__all__)


def test_one_root_error_per_package():
    from lwformat import errors

    classes = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, Exception)]
    roots = {c for c in classes if not any(issubclass(c, o) and c is not o for o in classes if o is not Exception)}
    assert all(issubclass(c, errors.LWFormatError) for c in classes)
    assert errors.LWFormatError in roots
    for name in (c.__name__ for c in classes):
        assert name in errors.__doc__, f"{name} is missing from the error tree drawn in errors.py"
