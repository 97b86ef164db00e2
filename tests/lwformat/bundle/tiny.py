"""The tiny world of the test vectors, loaded from spec/vectors/make_vectors.py, plus small helpers."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
VECTORS = ROOT / "spec" / "vectors"


def _load_generator():
    spec = importlib.util.spec_from_file_location("make_vectors", VECTORS / "make_vectors.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_vectors = _load_generator()
tiny_world = make_vectors.tiny_world
tiny_custom_world = make_vectors.tiny_custom_world
LLM, BACKBONE = make_vectors.LLM, make_vectors.BACKBONE
CHUNK = make_vectors.CHUNK


def write_tiny(root: Path, name: str = "b", **kwargs) -> Path:
    from lwformat.bundle.write import write_bundle

    kwargs = {"name": "lightworlds/tiny-noir", "version": "1.0.0", "chunk_size": CHUNK, **kwargs}
    write_bundle(tiny_custom_world(), root / name, **kwargs)
    return root / name


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Every file under `root` by relative path: to compare directories byte for byte."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
