import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import lwformat
from lwformat import Block, World
from lwformat.errors import WorldConfigError

# In a fresh interpreter: the zoo must not be imported yet, as in a user's program.
SCRIPT = """
import json, sys
from torch import nn
from lwformat import World, register_block, register_flow
from lwformat.errors import WorldConfigError

def refused(register, name):
    try:
        register(name)(lambda *a, **k: None)
    except WorldConfigError as err:
        return err.path
    return None

def mine(dim=4):
    return nn.Linear(dim, dim)

register_block("mine", "backbone")(mine)

def mine(dim=4):  # the cell run again (or the module reloaded): a new function, the same name and module
    return nn.Linear(dim, dim)

register_block("mine", "backbone")(mine)
import functools
register_block("made", "backbone")(functools.partial(mine, dim=4))
refused(lambda n: register_block(n, "backbone"), "anon")  # free: it takes the name
out = {
    # no name of their own (a partial; every lambda made in refused() has one qualified name): never "the same again"
    "partial": refused(lambda n: lambda fn: register_block(n, "backbone")(functools.partial(mine, dim=8)), "made"),
    "lambda": refused(lambda n: register_block(n, "backbone"), "anon"),
    "again": refused(lambda n: register_block(n, "backbone"), "mine"),
    "zoo_block": refused(lambda n: register_block(n, "conditioner"), "text_encoder"),
    "zoo_flow": refused(register_flow, "narrate"),
}
register_block("text_encoder", "conditioner", replace=True)(mine)
nodes = {"first": {"block": "text_encoder", "config": {"dim": 4}},
         "lm": {"block": "decoder_lm", "config": {"vocab_size": 16, "dim": 8, "layers": 1, "heads": 2, "context": 8}},
         "again": {"block": "text_encoder", "config": {"dim": 4}}}
spec = {"stages": {"s": {"pipelines": {"p": {"graphs": {"g": {"nodes": nodes}}}}}}}
open(sys.argv[1], "w").write(json.dumps(spec))
world = World.from_config(sys.argv[1])
out["built"] = [type(world.block(f"s/p/g/{n}").module).__name__ for n in nodes]
print(json.dumps(out))
"""


def test_a_registered_name_is_never_replaced_unasked(tmp_path):
    """A user's text_encoder held for the nodes built before the zoo's lazy import and was silently
    replaced by the zoo's for those after it; registering a taken name replaced it without a word."""
    root = Path(lwformat.__file__).parents[1]  # importable from there whether installed or not
    code = [sys.executable, "-c", SCRIPT, str(tmp_path / "world.json")]
    run = subprocess.run(code, check=False, cwd=root, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout) == {
        "partial": "made",
        "lambda": "anon",
        "again": "mine",
        "zoo_block": "text_encoder",
        "zoo_flow": "narrate",
        "built": ["Linear", "DecoderLM", "Linear"],
    }


def test_the_sequential_flow_names_the_key_it_reads():
    """A world of blocks run with another key died with a bare KeyError('x')."""
    world = World.from_blocks({"me/chat/text/lm": Block(nn.Sequential(nn.Linear(4, 4)), "llm")})
    with pytest.raises(WorldConfigError, match=r"state\['x'\].*\['tokens'\]"):
        world({"tokens": torch.zeros(1, 4)})
    assert world({"x": torch.zeros(1, 4)})["x"].shape == (1, 4)
