import json

import pytest

from lwformat import World, register_block
from lwformat.errors import UnknownBlockError, WorldConfigError
from lwformat.world import config
from tests.conftest import TinyNet


@register_block("test_tinynet", "llm")
def _tinynet(vocab: int = 16, dim: int = 8) -> TinyNet:
    return TinyNet(vocab, dim)


SPEC = {
    "name": "mini",
    "cycle": ["author", "environment"],
    "stages": {
        "author": {"pipelines": {"narrate": {"graphs": {"text": {"nodes": {"llm": {"block": "test_tinynet", "config": {"dim": 8}}}}}}}},
        "environment": {"pipelines": {"describe": {"graphs": {"text": {"nodes": {"llm": {"ref": "author/narrate/text/llm"}}}}}}},
    },
}


def write(tmp_path, spec, suffix=".json"):
    path = tmp_path / f"world{suffix}"
    path.write_text(json.dumps(spec))
    return path


def test_world_from_json_config_shares_refs(tmp_path):
    world = World.from_config(write(tmp_path, SPEC))
    assert world.name == "mini"
    assert world.cycle == ["author", "environment"]
    assert world.block("environment/describe/text/llm") is world.block("author/narrate/text/llm")
    assert isinstance(world.block("author/narrate/text/llm").module, TinyNet)


def test_world_from_toml_config(tmp_path):
    path = tmp_path / "world.toml"
    path.write_text(
        """
name = "toml-world"
[stages.author.pipelines.narrate.graphs.text.nodes.llm]
block = "test_tinynet"
config = { dim = 4 }
"""
    )
    world = World.from_config(path)
    assert world.block("author/narrate/text/llm").module.fc.in_features == 4


def test_meta_device_builds_shapes_only(tmp_path):
    world = World.from_config(write(tmp_path, SPEC), device="meta")
    assert world.block("author/narrate/text/llm").module.fc.weight.is_meta


@pytest.mark.parametrize(
    ("mutate", "error", "where"),
    [
        (lambda s: s["stages"]["author"]["pipelines"]["narrate"]["graphs"]["text"]["nodes"]["llm"].update(block="nope"), UnknownBlockError, "author/narrate/text/llm"),
        (lambda s: s["stages"]["environment"]["pipelines"]["describe"]["graphs"]["text"]["nodes"]["llm"].update(ref="author/x/y/z"), WorldConfigError, "environment/describe/text/llm"),
        (lambda s: s["stages"]["author"]["pipelines"]["narrate"]["graphs"]["text"]["nodes"]["llm"].update(ref="a/b/c/d"), WorldConfigError, "author/narrate/text/llm"),
        (lambda s: s["stages"]["author"]["pipelines"]["narrate"]["graphs"]["text"]["nodes"]["llm"].update(config={"bogus": 1}), WorldConfigError, "author/narrate/text/llm"),
    ],
)
def test_bad_configs_name_the_node(tmp_path, mutate, error, where):
    spec = json.loads(json.dumps(SPEC))
    mutate(spec)
    with pytest.raises(error) as err:
        World.from_config(write(tmp_path, spec))
    assert err.value.path == where


LM = {"vocab_size": 16, "dim": 8, "layers": 1, "heads": 2, "context": 8}


@pytest.mark.parametrize(("config", "cause"), [({**LM, "vocab_size": -1}, RuntimeError), ({**LM, "heads": 3}, ValueError)])
def test_bad_values_name_the_node(tmp_path, config, cause):
    """Values the block refuses escaped as torch's bare RuntimeError or the block's own ValueError."""
    spec = {"stages": {"a": {"pipelines": {"p": {"graphs": {"g": {"nodes": {"n": {"block": "decoder_lm", "config": config}}}}}}}}}
    with pytest.raises(WorldConfigError, match="decoder_lm") as err:
        World.from_config(write(tmp_path, spec))
    assert err.value.path == "a/p/g/n"
    assert type(err.value.__cause__) is cause


def test_schema_errors_say_where():
    with pytest.raises(WorldConfigError, match=r"at `\$\.stages\[\.\.\.\]\.pipelines`"):
        config.decode(json.dumps({"stages": {"author": {"pipelines": 3}}}))
    with pytest.raises(WorldConfigError, match="format"):
        config.decode(json.dumps({"stages": {}, "format": "lwworld/2"}))


def test_config_encoding_is_canonical(tmp_path):
    spec = config.read(write(tmp_path, SPEC))
    assert config.encode(spec) == config.encode(config.decode(config.encode(spec)))
    assert b" " not in config.encode(spec)


def test_a_backend_without_the_op_is_not_called_a_bad_config(tmp_path):
    """NotImplementedError is a RuntimeError, yet no config value is wrong: it passes through."""
    from lwformat import register_block

    @register_block("test_config_no_backend", "backbone", replace=True)
    def no_backend():
        raise NotImplementedError("the op is not implemented for this device")

    spec = {"stages": {"a": {"pipelines": {"p": {"graphs": {"g": {"nodes": {"n": {"block": "test_config_no_backend"}}}}}}}}}
    with pytest.raises(NotImplementedError, match="this device"):
        World.from_config(write(tmp_path, spec))
