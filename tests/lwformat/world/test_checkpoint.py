import json
import os
import warnings

import pytest
import torch
from safetensors import safe_open

from lwformat import Block, World
from lwformat.errors import CheckpointError, WorldConfigError
from tests.conftest import TinyNet
from tests.lwformat.world.test_config import SPEC, write


def built(tmp_path, seed=0):
    torch.manual_seed(seed)
    return World.from_config(write(tmp_path, SPEC))


def test_save_load_round_trip_is_bit_exact(tmp_path):
    world = built(tmp_path)
    world.save(tmp_path / "base")
    loaded = World.load(tmp_path / "base")
    for (name, a), (_, b) in zip(world.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert loaded.root_digest() == world.root_digest()
    assert loaded.block("environment/describe/text/llm") is loaded.block("author/narrate/text/llm")
    World.load(tmp_path / "base", verify=True)


def test_files_store_each_shared_block_once(tmp_path):
    built(tmp_path).save(tmp_path / "base")
    assert sorted(p.name for p in (tmp_path / "base").iterdir()) == ["digests.json", "weights.safetensors", "world.json"]
    with safe_open(str(tmp_path / "base" / "weights.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert all(k.startswith("author/narrate/text/llm:") for k in keys)
    digests = json.loads((tmp_path / "base" / "digests.json").read_text())
    assert list(digests["blocks"]) == ["author/narrate/text/llm"]


def test_cached_digests_are_used_and_verify_recomputes(tmp_path):
    built(tmp_path).save(tmp_path / "base")
    record = json.loads((tmp_path / "base" / "digests.json").read_text())
    record["blocks"]["author/narrate/text/llm"] = "sha256:" + "0" * 64
    (tmp_path / "base" / "digests.json").write_text(json.dumps(record))
    assert World.load(tmp_path / "base").digests()["author/narrate/text/llm"] == "sha256:" + "0" * 64
    with pytest.raises(CheckpointError) as err:
        World.load(tmp_path / "base", verify=True)
    assert err.value.path == "author/narrate/text/llm"


def _edit(path, edit):
    record = json.loads(path.read_text())
    edit(record)
    path.write_text(json.dumps(record))


@pytest.mark.parametrize(
    ("tamper", "where"),
    [
        (lambda d: (d / "digests.json").unlink(), "digests.json"),
        (lambda d: _edit(d / "digests.json", lambda r: r.update(blocks={})), "author/narrate/text/llm"),
        (lambda d: _edit(d / "digests.json", lambda r: r["blocks"].update({"x/y/z/w": r["root"]})), "x/y/z/w"),
        (lambda d: _edit(d / "world.json", lambda s: s["cycle"].reverse()), "digests.json"),
    ],
    ids=["no-digests", "no-blocks", "unknown-block", "other-root"],
)
def test_verify_refuses_what_it_cannot_check(tmp_path, tamper, where):
    """verify=True loaded these: the weights went unchecked, or the recorded root was never compared."""
    built(tmp_path).save(tmp_path / "base")
    tamper(tmp_path / "base")
    with pytest.raises(CheckpointError) as err:
        World.load(tmp_path / "base", verify=True)
    assert err.value.path.endswith(where)


def test_digests_saved_before_the_root_covered_the_order_still_verify(tmp_path):
    """A world saved with lwdigests/1 (its root made without the order) failed verify=True as if
    world.json had been edited; its blocks are still checked, a format to come is refused."""
    built(tmp_path).save(tmp_path / "base")
    record = json.loads((tmp_path / "base" / "digests.json").read_text())
    assert record["format"] == "lwdigests/2"
    _edit(tmp_path / "base" / "digests.json", lambda r: r.update(format="lwdigests/1", root="sha256:" + "1" * 64))
    World.load(tmp_path / "base", verify=True)
    _edit(tmp_path / "base" / "digests.json", lambda r: r["blocks"].update({"author/narrate/text/llm": "sha256:" + "0" * 64}))
    with pytest.raises(CheckpointError) as err:
        World.load(tmp_path / "base", verify=True)
    assert err.value.path == "author/narrate/text/llm"
    _edit(tmp_path / "base" / "digests.json", lambda r: r.update(format="lwdigests/3"))
    with pytest.raises(CheckpointError, match="lwdigests/3"):
        World.load(tmp_path / "base")


@pytest.mark.parametrize("text", ["{not json", '{"root": 1, "blocks": []}', '{"root": "sha256:00", "blocks": {}}'])
@pytest.mark.parametrize("verify", [False, True])
def test_a_corrupt_digests_file_is_a_checkpoint_error(tmp_path, text, verify):
    built(tmp_path).save(tmp_path / "base")
    (tmp_path / "base" / "digests.json").write_text(text)
    with pytest.raises(CheckpointError, match="unreadable digests") as err:
        World.load(tmp_path / "base", verify=verify)
    assert err.value.path == str(tmp_path / "base" / "digests.json")


def test_weights_that_do_not_fit_the_config_are_refused(tmp_path):
    built(tmp_path).save(tmp_path / "base")
    spec = json.loads((tmp_path / "base" / "world.json").read_text())
    spec["stages"]["author"]["pipelines"]["narrate"]["graphs"]["text"]["nodes"]["llm"]["config"]["dim"] = 4
    (tmp_path / "base" / "world.json").write_text(json.dumps(spec))
    with pytest.raises(CheckpointError, match="author/narrate/text/llm:") as err:
        World.load(tmp_path / "base")
    assert err.value.path.startswith("author/narrate/text/llm:")


def test_missing_files_and_module_built_blocks(tmp_path):
    with pytest.raises(CheckpointError, match="missing world.json"):
        World.load(tmp_path)
    world = World.from_blocks({"s/p/g/n": Block(TinyNet(), "llm")})
    with pytest.raises(WorldConfigError, match="register it"):
        world.save(tmp_path / "nope")
    assert not (tmp_path / "nope").exists()


def test_a_tensor_above_the_blocks_is_refused_before_writing(tmp_path):
    """save() stored it as ':<name>', which world.json cannot rebuild: load() refused the checkpoint save() wrote."""
    world = built(tmp_path)
    world.stages["author"].register_parameter("style_gain", torch.nn.Parameter(torch.ones(4)))
    with pytest.raises(WorldConfigError, match="above the block level") as err:
        world.save(tmp_path / "base")
    assert err.value.path == "stages.author.style_gain"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["world.json"]


def test_save_replaces_an_existing_checkpoint_whole(tmp_path):
    built(tmp_path, seed=0).save(tmp_path / "base")
    second = built(tmp_path, seed=1)
    second.save(tmp_path / "base")
    assert World.load(tmp_path / "base").root_digest() == second.root_digest()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "world.json"]


def test_save_replaces_only_an_empty_directory_or_a_saved_world(tmp_path):
    """save() replaced any directory whole: the user's files in it were deleted without a word."""
    world = built(tmp_path)
    (tmp_path / "empty").mkdir()
    world.save(tmp_path / "empty")
    assert World.load(tmp_path / "empty").root_digest() == world.root_digest()
    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    (project / "notes.txt").write_text("months of work")
    (project / "world.json").write_text("{}")  # a hand-written config of the same name
    (tmp_path / "file").write_text("not a directory")
    for target in (project, tmp_path / "file"):
        with pytest.raises(CheckpointError, match="neither empty nor a saved world") as err:
            world.save(target)
        assert err.value.path == str(target)
    (tmp_path / "link").symlink_to(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="symbolic link"):
        world.save(tmp_path / "link")
    assert sorted(p.name for p in project.iterdir()) == ["data", "notes.txt", "world.json"]
    assert (project / "notes.txt").read_text() == "months of work"
    assert (tmp_path / "file").read_text() == "not a directory"
    assert (tmp_path / "link").is_symlink() and (tmp_path / "empty" / "world.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "file", "link", "project", "world.json"]  # no temporaries
    world.save(tmp_path / "empty")  # a saved world is replaced


def test_save_to_the_current_directory_is_a_typed_refusal(tmp_path, monkeypatch):
    """save('.') raised a bare ValueError (no name to stage beside); replacing the current directory
    whole would leave the process in a deleted one."""
    world = built(tmp_path)
    (tmp_path / "here" / "below").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "here" / "below")
    (tmp_path / "alias").symlink_to(tmp_path / "here")
    for target in (".", "..", tmp_path / "here", tmp_path / "alias" / "below"):  # the last through a link
        with pytest.raises(CheckpointError, match="the current directory"):
            world.save(target)
    assert os.getcwd() == str(tmp_path / "here" / "below") and not list((tmp_path / "here" / "below").iterdir())
    world.save("new")
    assert World.load(tmp_path / "here" / "below" / "new").root_digest() == world.root_digest()


def test_a_saved_world_loads_in_its_own_order(tmp_path):
    """Stages, pipelines, graphs and nodes run in order, and a ref names a node built before it: sorting them
    made worlds that could not load, loaded ones that computed otherwise, and bundles that listed their slots
    in another order (no swap between a bundle made on the built world and one made on the loaded one)."""
    import msgspec

    from lwformat import LightConfig
    from lwformat.world.config import GraphSpec, NodeSpec, PipelineSpec, StageSpec
    from lwformat.zoo import reference_spec

    spec = reference_spec("tiny")
    stages = dict(spec.stages)  # the architect (sorting first) shares the philosopher's conditioner
    stages["architect"] = StageSpec(pipelines={"layout": PipelineSpec(graphs={"scene": GraphSpec(
        nodes={"conditioner": NodeSpec(ref="philosopher/reflect/ideas/conditioner")}, flow="layout")})})  # fmt: skip
    torch.manual_seed(0)
    world = World.from_spec(msgspec.structs.replace(spec, stages=stages))
    world.save(tmp_path / "base")
    loaded = World.load(tmp_path / "base")
    assert [path for path, _ in loaded.walk()] == [path for path, _ in world.walk()]
    x = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = world({"tokens": x}), loaded({"tokens": x})
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    config = LightConfig(kind="lora", rank=2, block_types=["llm", "conditioner"])
    assert [s.slot for s in world.plan(config).slots] == [s.slot for s in loaded.plan(config).slots]


def test_a_fused_world_is_not_saved_as_a_base_and_loading_leaves_the_generator_alone(tmp_path):
    from lwformat.errors import FusedError
    from lwformat.zoo import reference_world
    from tests.lwformat.runtime.conftest import make_bundle

    world = reference_world("tiny", seed=0)
    world.apply(make_bundle(tmp_path, 1))
    world.fuse()
    with pytest.raises(FusedError):
        world.save(tmp_path / "fused")
    assert not (tmp_path / "fused").exists()
    world.unfuse()
    with pytest.warns(UserWarning, match="applied bundles"):
        world.save(tmp_path / "base")
    torch.manual_seed(5)
    World.load(tmp_path / "base")
    after = torch.rand(3)
    torch.manual_seed(5)
    assert torch.equal(torch.rand(3), after)


def test_saving_a_customized_or_applied_world_warns_that_only_the_base_is_written(tmp_path):
    """A PEFT user expects world.save to keep the adapters being trained: it writes the base (which
    is legitimate, so a warning, not an error) and says how to save the adapters."""
    from lwformat import LightConfig
    from lwformat.zoo import reference_world
    from tests.lwformat.runtime.conftest import make_bundle

    world = reference_world("tiny", seed=0)
    base = world.root_digest()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        world.save(tmp_path / "plain")  # a bare base: nothing to say
    world.customize(LightConfig(rank=2, block_types=["llm"]))
    with pytest.warns(UserWarning, match=r"save_adapters.*write_bundle") as caught:
        world.save(tmp_path / "customized")
    assert caught[0].filename == __file__  # it points at the caller's line
    assert World.load(tmp_path / "customized").root_digest() == base
    world.decustomize()
    world.apply(make_bundle(tmp_path, 1))
    with pytest.warns(UserWarning, match="applied bundles \\(author/noir;"):
        world.save(tmp_path / "applied")
