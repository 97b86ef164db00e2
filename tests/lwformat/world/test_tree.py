import pytest
import torch
from torch import nn

from lwformat import Block, World
from lwformat.errors import WorldConfigError, WorldPathError
from tests.conftest import TinyNet


def test_paths_and_shared_block(world):
    paths = world.block_paths()
    assert paths["environment/describe/text/llm"] == "author/narrate/text/llm"
    assert list(world.blocks()) == ["author/narrate/text/llm", "author/narrate/text/critic", "creator/render/t2i/backbone"]
    assert world.block("environment/describe/text/llm") is world.block("author/narrate/text/llm")


def test_levels_are_traversable(world):
    assert list(world.stages) == ["author", "creator", "environment"]
    stage = world.stage("author")
    assert list(stage.pipelines) == ["narrate"]
    assert list(stage.pipelines["narrate"].graphs["text"].nodes) == ["llm", "critic"]


def test_unknown_path_is_a_typed_error_naming_it(world):
    with pytest.raises(WorldPathError) as err:
        world.block("author/narrate/text/nope")
    assert err.value.path == "author/narrate/text/nope"
    with pytest.raises(KeyError):  # WorldPathError is a KeyError too
        world.block("not-a-path")


def test_bad_names_are_refused():
    with pytest.raises(WorldConfigError, match="not a block path") as err:
        World.from_blocks({"auth or/narrate/text/llm": Block(nn.Linear(2, 2), "llm")})
    assert err.value.path == "auth or/narrate/text/llm"
    with pytest.raises(WorldConfigError, match="not a valid name"):
        Block(nn.Linear(2, 2), "l l m")


def test_graph_runs_its_blocks_in_order():
    torch.manual_seed(0)
    a, b = nn.Linear(3, 4), nn.Linear(4, 2)
    world = World.from_blocks({"s/p/g/a": Block(a, "x"), "s/p/g/b": Block(b, "x")})
    x = torch.randn(5, 3)
    out = world({"x": x})
    torch.testing.assert_close(out["x"], b(a(x)), rtol=0, atol=0)


def test_extra_tensors_are_those_above_blocks(world):
    assert list(world.extra_tensors()) == ["stages.creator.style_gain"]


def test_tree_lists_levels_params_and_slots(world):
    text = world.tree()
    assert "author" in text and "narrate" in text and "text" in text
    assert "llm  [llm: TinyNet]" in text
    assert "shared with author/narrate/text/llm" in text
    assert "5 slots" in text  # emb, fc, seq, img, head


def test_any_module_can_be_a_block():
    block = Block(TinyNet(), "llm")
    world = World.from_blocks({"s/p/g/n": block})
    tokens = torch.randint(0, 16, (2, 3))
    assert torch.equal(world.block("s/p/g/n")(tokens), block.module(tokens))


def test_an_unknown_flow_names_its_graph():
    with pytest.raises(WorldConfigError) as caught:
        World.from_blocks({"s/p/g/a": Block(nn.Linear(2, 2), "x")}, flows={"s/p/g": "sequentail"})
    assert caught.value.path == "s/p/g" and "sequential" in str(caught.value)


def test_a_flow_for_no_graph_is_refused():
    """A typo in a flows key was ignored: the graph ran the default flow instead of the one asked for."""
    with pytest.raises(WorldConfigError, match="names no graph") as caught:
        World.from_blocks({"s/p/g/a": Block(nn.Linear(2, 2), "x")}, flows={"s/p/gg": "sequential"})
    assert caught.value.path == "s/p/gg"
