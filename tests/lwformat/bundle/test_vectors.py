"""Every vector of spec/vectors/index.json has its expected outcome; the generator reproduces them."""

from __future__ import annotations

import json

import pytest

from lwformat import errors
from lwformat.bundle.check import check
from lwformat.bundle.read import Bundle
from lwformat.bundle.verify import verify_files

from tests.lwformat.bundle.tiny import VECTORS, make_vectors, tiny_world, tree_bytes

INDEX = json.loads((VECTORS / "index.json").read_text())["vectors"]
WORLD = tiny_world()


def run(vector: dict) -> tuple[str, str | None]:
    """(stage reached, id of the manifest) or raise the vector's error."""
    with Bundle.open(VECTORS / vector["path"]) as bundle:
        verify_files(bundle)
        if "check" in vector:
            check(bundle, WORLD, strict=vector["check"]["strict"]).raise_for_problems()
        return bundle.manifest_id


def stage_of(vector: dict) -> str:
    try:
        Bundle.open(VECTORS / vector["path"]).close()
    except errors.BundleError:
        return "open"
    with Bundle.open(VECTORS / vector["path"]) as bundle:
        try:
            verify_files(bundle)
        except errors.BundleError:
            return "verify"
    return "check"


@pytest.mark.parametrize("vector", INDEX, ids=[v["name"] for v in INDEX])
def test_vector(vector):
    expect = vector["expect"]
    if expect.get("outcome") == "ok":
        identity = run(vector)
        if "same_identity_as" in vector:
            twin = next(v for v in INDEX if v["name"] == vector["same_identity_as"])
            assert identity == run(twin)
        return
    cls = getattr(errors, expect["error"])
    with pytest.raises(errors.LWFormatError) as info:
        run(vector)
    assert type(info.value) is cls, info.value
    assert stage_of(vector) == expect["stage"]
    for field in ("path", "field", "chunk", "limit", "outcome"):
        if field in expect:
            assert getattr(info.value, field) == expect[field], field


MINE = {"index.json", "digests.json", "make_vectors.py"}  # beside the listed vectors; signed/ is spec/signature.md's


def _mine(tree: dict[str, bytes]) -> dict[str, bytes]:
    top = {v["path"] for v in INDEX} | MINE - {"make_vectors.py"}
    return {k: v for k, v in tree.items() if k.split("/")[0] in top}


def test_index_lists_every_vector_and_they_stay_small():
    on_disk = {p.name for p in VECTORS.iterdir()} - MINE - {"signed", "__pycache__"}
    assert {v["path"] for v in INDEX} == on_disk
    assert sum(map(len, _mine(tree_bytes(VECTORS)).values())) < 1 << 19


def test_the_generator_reproduces_every_byte(tmp_path):
    make_vectors.main(tmp_path)
    made, committed = tree_bytes(tmp_path), _mine(tree_bytes(VECTORS))
    assert made.keys() == committed.keys()
    for name, data in made.items():
        assert data == committed[name], name
