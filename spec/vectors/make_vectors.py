"""Generate the bundle test vectors: python spec/vectors/make_vectors.py [OUT]

Deterministic: the tiny world's weights come from arithmetic, not a random generator, so
running this again gives the same bytes (with the same zstd library for the archives).
`index.json` lists every vector and its expected outcome; `digests.json` holds digest
vectors for tensors, blocks and the world. A test regenerates everything and compares.

Expected outcomes: ``{"outcome": "ok"}``, or the error class and where it must be raised
(``stage``: open = `Bundle.open`, verify = `verify_files`, check = `check(...)
.raise_for_problems()` against the tiny world), with the fields it must carry.
"""

from __future__ import annotations

import json
import shutil
import struct
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # run from anywhere, uninstalled

import torch  # noqa: E402
import zstandard  # noqa: E402
from torch import nn  # noqa: E402

from lwformat.adapters import LightConfig  # noqa: E402
from lwformat.adapters.checkpoint import adapter_tensors  # noqa: E402
from lwformat.bundle import tar  # noqa: E402
from lwformat.bundle.archive import ZSTD_LEVEL, pack  # noqa: E402
from lwformat.bundle.canonical import encode  # noqa: E402
from lwformat.bundle.hashing import FileHasher  # noqa: E402
from lwformat.bundle.manifest import MANIFEST, WEIGHTS  # noqa: E402
from lwformat.bundle.write import write_bundle  # noqa: E402
from lwformat.world import Block, World  # noqa: E402
from lwformat.world.digest import base_tensors, dtype_name, tensor_bytes, tensor_digest, world_digests  # noqa: E402

CHUNK = 1 << 16
LLM, BACKBONE = "author/narrate/text/llm", "creator/render/t2i/backbone"
BAD = "adapters.safetensors"


def fill(t: torch.Tensor, seed: int) -> None:
    """Exact multiples of 1/16 in [-1/2, 1/2]: the same bits in F32 and BF16 on every machine."""
    vals = ((torch.arange(t.numel(), dtype=torch.float64) * 7 + seed) % 17 - 8) / 16  # (numel,)
    t.copy_(vals.reshape(t.shape).to(t.dtype))


def tiny_world() -> World:
    """Two blocks: an F32 "llm" of two 8x8 Linears and a BF16 "backbone" of one 8->4 Linear."""
    world = World.from_blocks({
        LLM: Block(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)), "llm"),
        BACKBONE: Block(nn.Sequential(nn.Linear(8, 4)).to(torch.bfloat16), "backbone"),
    }, name="tiny")  # fmt: skip
    with torch.no_grad():
        for i, (_, p) in enumerate(sorted(world.named_parameters())):
            fill(p, i)
    return world


def tiny_custom_world() -> World:
    """`tiny_world` with LoRA rank 2 on every Linear, the adapters filled deterministically.

    The backbone's adapters are stored in BF16, its layer's dtype (a writer may also store
    F32 there, as `customize` now trains them): the vectors keep a bundle of two float runs.
    """
    world = tiny_world()
    world.customize(LightConfig(rank=2, name="noir"))
    with torch.no_grad():
        for i, (key, t) in enumerate(sorted(adapter_tensors(world).items())):
            if key.startswith(BACKBONE):
                t.data = t.data.to(torch.bfloat16)
            fill(t, 100 + i)
    return world


# -- helpers that build broken bundles out of the valid one ------------------------------------


def manifest_of(d: Path) -> dict:
    return json.loads((d / MANIFEST).read_bytes())


def put_manifest(d: Path, value: dict) -> None:
    # plain json.dumps: it writes the canonical form, and also the invalid values vectors need
    (d / MANIFEST).write_bytes(json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode())


def rehash(d: Path) -> None:
    """Make the manifest's file entry match the (changed) weights file, so only its structure is wrong."""
    m = manifest_of(d)
    h = FileHasher(m["chunk_size"])
    h.update((d / WEIGHTS).read_bytes())
    e = h.entry(WEIGHTS)
    m["files"] = [{"path": WEIGHTS, "size": e.size, "sha256": e.sha256, "chunks": e.chunks}]
    put_manifest(d, m)


def edit_header(d: Path, edit) -> None:
    raw = (d / WEIGHTS).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    data = edit(header, raw[8 + n :])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % 64)
    (d / WEIGHTS).write_bytes(struct.pack("<Q", len(text)) + text + data)
    rehash(d)


def archive(members: list[tuple[str, bytes, bytes, str]], *, content_size: bool = True) -> bytes:
    """A tar of (name, data, typeflag, linkname) members, zstd-compressed like `pack` does."""
    body = b"".join(
        tar.header(name, len(data), typeflag=flag, linkname=link) + data + bytes(tar.padding(len(data)))
        for name, data, flag, link in members
    ) + tar.END  # fmt: skip
    cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_checksum=True, write_content_size=content_size)
    if content_size:
        return cctx.compress(body)
    z = cctx.compressobj()
    return z.compress(body) + z.flush()


def declared_bomb() -> bytes:
    """A zstd frame whose header declares 1 TiB of content but holds 4 bytes."""
    fcs = (1 << 40).to_bytes(8, "little")
    descriptor = bytes([0b1110_0000])  # 8-byte content size, single segment, no checksum, no dictionary
    block = ((4 << 3) | 1).to_bytes(3, "little") + b"\0\0\0\0"  # last block, raw, 4 bytes
    return b"\x28\xb5\x2f\xfd" + descriptor + fcs + block


def expanding_bomb(valid: Path) -> bytes:
    """A valid manifest, then a member that expands to 80 MiB of NULs from a few KiB (no declared size)."""
    big = 80 << 20
    m = manifest_of(valid)
    m["chunk_size"] = 1 << 30
    m["files"] = [{"path": WEIGHTS, "size": big, "sha256": "0" * 64, "chunks": ["0" * 64]}]
    manifest = encode(m)
    cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_content_size=False)
    z = cctx.compressobj()
    out = z.compress(tar.header(MANIFEST, len(manifest)) + manifest + bytes(tar.padding(len(manifest))))
    out += z.compress(tar.header(WEIGHTS, big))
    zeros = bytes(1 << 20)
    for _ in range(big >> 20):
        out += z.compress(zeros)
    return out + z.compress(tar.END) + z.flush()


def _rm(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


# -- the vectors ---------------------------------------------------------------------------------

VECTORS: list[tuple[str, str, dict, dict, object]] = []  # (path, about, expect, options, make)
OK = {"outcome": "ok"}


def err(error: str, stage: str, **fields: object) -> dict:
    return {"error": error, "stage": stage, **fields}


def vector(path: str, about: str, expect: dict, **options: object):
    def register(make):
        VECTORS.append((path, about, expect, options, make))
        return make

    return register


def from_valid(edit):
    """A directory vector: the valid bundle, then `edit(dir)`."""

    def make(target: Path, valid: Path) -> None:
        shutil.copytree(valid, target)
        edit(target)

    return make


def manifest_edit(change):
    def edit(d: Path) -> None:
        m = manifest_of(d)
        change(m)
        put_manifest(d, m)

    return from_valid(edit)


def raw_manifest(text: bytes):
    return from_valid(lambda d: (d / MANIFEST).write_bytes(text))


def lwb(make_bytes):
    def make(target: Path, valid: Path) -> None:
        target.write_bytes(make_bytes(valid))

    return make


def members(valid: Path) -> list[tuple[str, bytes, bytes, str]]:
    return [(n, (valid / n).read_bytes(), b"0", "") for n in sorted(p.name for p in valid.iterdir())]


def flip_data_byte(d: Path) -> None:
    raw = bytearray((d / WEIGHTS).read_bytes())
    raw[-5] ^= 0x01  # inside the last tensor's data
    (d / WEIGHTS).write_bytes(bytes(raw))


def overlap(header: dict, data: bytes) -> bytes:
    header[f"{LLM}:0.lora_B"]["data_offsets"] = [32, 96]  # lora_A is [0, 64]
    return data


def out_of_bounds(header: dict, data: bytes) -> bytes:
    key = f"{BACKBONE}:0.lora_B"
    size = header[key]["data_offsets"][1] - header[key]["data_offsets"][0]
    header[key]["data_offsets"] = [len(data), len(data) + size]
    return data


def swapped(header: dict, data: bytes) -> bytes:
    a, b = header[f"{LLM}:0.lora_A"], header[f"{LLM}:1.lora_A"]  # same size: swap places
    (a0, a1), (b0, b1) = a["data_offsets"], b["data_offsets"]
    a["data_offsets"], b["data_offsets"] = [b0, b1], [a0, a1]
    return data[:a0] + data[b0:b1] + data[a1:b0] + data[a0:a1] + data[b1:]


def oversized_header(d: Path) -> None:
    (d / WEIGHTS).write_bytes(struct.pack("<Q", (16 << 20) + 64) + b"{}")
    rehash(d)


def set_in(path: list, value: object):
    def change(m: dict) -> None:
        target = m
        for k in path[:-1]:
            target = target[k]
        target[path[-1]] = value

    return change


def first_key(m: dict) -> str:
    return next(iter(m["base"]["blocks"]))


vector("valid-dir", "a valid bundle directory of the tiny world", OK, check={"strict": True})(None)
vector("valid.lwb", "the same bundle packed as an archive", OK, check={"strict": True},
       same_identity_as="valid-dir")(lambda target, valid: pack(valid, target))  # fmt: skip
vector("noncanonical-manifest", "the manifest pretty-printed with keys reversed: readers accept it",
       OK, check={"strict": True}, same_identity_as="valid-dir")(raw_manifest(b""))  # bytes set in main
vector("minor-version-extra-fields", "spec lwbundle/1.7 with fields a 1.0 reader does not know: accepted",
       OK, check={"strict": True})(manifest_edit(lambda m: (m.update(spec="lwbundle/1.7", future={"x": [1, 2.5]}),
                                                              m["slots"][0].update(future_slot=True))))  # fmt: skip
vector("wrong-root", "the root digest differs: fine unless strict", OK, check={"strict": False})(
    manifest_edit(set_in(["base", "root"], "sha256:" + "ab" * 32)))
vector("wrong-root-strict", "the same bundle checked in strict mode",
       err("IncompatibleError", "check", path="root", outcome="root mismatch"), check={"strict": True},
       reuse="wrong-root")(None)  # fmt: skip
vector("wrong-base-digest", "a touched block's digest differs from the world's",
       err("IncompatibleError", "check", path=LLM, outcome="digest mismatch"), check={"strict": False})(
    manifest_edit(lambda m: m["base"]["blocks"].update({LLM: "sha256:" + "cd" * 32})))
vector("tampered-weight", "one byte of tensor data flipped", err("IntegrityError", "verify", path=WEIGHTS, chunk=0))(
    from_valid(flip_data_byte))
vector("tampered-manifest-chunk", "the manifest's chunk digest changed",
       err("IntegrityError", "verify", path=WEIGHTS, chunk=0))(
    manifest_edit(lambda m: m["files"][0].update(chunks=["ef" * 32])))
vector("tampered-manifest-sha256", "the manifest's whole-file digest changed",
       err("IntegrityError", "verify", path=WEIGHTS, chunk=None))(
    manifest_edit(lambda m: m["files"][0].update(sha256="ef" * 32)))
vector("tampered-manifest-shape", "a tensor's shape changed in the manifest",
       err("BundleFormatError", "open", path=WEIGHTS, field=f"{LLM}:0.lora_B"))(
    manifest_edit(lambda m: m["slots"][0]["tensors"]["lora_B"].update(shape=[8, 3])))
vector("unknown-major", "spec lwbundle/2.0", err("UnsupportedVersionError", "open", path=MANIFEST, field="$.spec"))(
    manifest_edit(set_in(["spec"], "lwbundle/2.0")))
vector("bad-semver", "version 1.0", err("BundleFormatError", "open", path=MANIFEST, field="$.version"))(
    manifest_edit(set_in(["version"], "1.0")))
vector("bad-name", "name with a space and capitals", err("BundleFormatError", "open", path=MANIFEST, field="$.name"))(
    manifest_edit(set_in(["name"], "Tiny Noir")))
vector("bad-tensor-key", "a tensor key that does not name its slot",
       err("BundleFormatError", "open", path=MANIFEST, field="$.slots[0].tensors.lora_A.key"))(
    manifest_edit(lambda m: m["slots"][0]["tensors"]["lora_A"].update(key="x:y.lora_A")))
vector("unbound-block", "a slot whose block has no digest in the base binding",
       err("BundleFormatError", "open", path=MANIFEST, field="$.slots[2].block"))(
    manifest_edit(lambda m: m["base"]["blocks"].pop(BACKBONE)))
vector("wrong-chunk-count", "two chunk digests for a file of one chunk",
       err("BundleFormatError", "open", path=MANIFEST, field="$.files[0].chunks"))(
    manifest_edit(lambda m: m["files"][0]["chunks"].append("00" * 32)))
vector("duplicate-key", "a manifest object with a key twice", err("BundleFormatError", "open", path=MANIFEST))(
    raw_manifest(b""))  # bytes set in main
vector("nan", "alpha is NaN", err("BundleFormatError", "open", path=MANIFEST))(raw_manifest(b""))
vector("big-integer", "an integer past 2^53 - 1", err("BundleFormatError", "open", path=MANIFEST))(
    manifest_edit(set_in(["provenance"], {"steps": 1 << 60})))
vector("weights-not-listed", "the manifest's file list misses adapters.safetensors",
       err("BundleFormatError", "open", path=MANIFEST, field="$.files"))(manifest_edit(set_in(["files"], [])))
vector("unlisted-file", "a file the manifest does not list", err("BundleFormatError", "open", path="notes.txt"))(
    from_valid(lambda d: (d / "notes.txt").write_bytes(b"hello\n")))
vector("missing-file", "the weights file is absent", err("IntegrityError", "open", path=WEIGHTS))(
    from_valid(lambda d: (d / WEIGHTS).unlink()))
vector("truncated-weights", "the weights file lost its last 16 bytes", err("IntegrityError", "open", path=WEIGHTS))(
    from_valid(lambda d: (d / WEIGHTS).write_bytes((d / WEIGHTS).read_bytes()[:-16])))
vector("overlapping-offsets", "two tensors share bytes", err("BundleFormatError", "open", path=WEIGHTS,
       field=f"{LLM}:0.lora_B"))(from_valid(lambda d: edit_header(d, overlap)))  # fmt: skip
vector("offsets-out-of-bounds", "a tensor's offsets run past the data", err("BundleFormatError", "open",
       path=WEIGHTS, field=f"{BACKBONE}:0.lora_B"))(from_valid(lambda d: edit_header(d, out_of_bounds)))  # fmt: skip
vector("not-canonical-order", "a valid safetensors file whose tensors are not in canonical order",
       err("BundleFormatError", "open", path=WEIGHTS, field=f"{LLM}:0.lora_A"))(
    from_valid(lambda d: edit_header(d, swapped)))
vector("oversized-header", "a safetensors header length of 16 MiB + 64",
       err("BundleLimitError", "open", path=WEIGHTS, limit="MAX_HEADER_BYTES"))(from_valid(oversized_header))
vector("truncated.lwb", "the archive cut in half", err("BundleFormatError", "open"))(
    lwb(lambda v: archive(members(v))[: len(archive(members(v))) // 2]))
vector("truncated-checksum.lwb", "the archive without the last 2 bytes of its frame's checksum",
       err("BundleFormatError", "open"))(lwb(lambda v: archive(members(v))[:-2]))
vector("not-zstd.lwb", "an uncompressed tar", err("BundleFormatError", "open"))(
    lwb(lambda v: b"".join(tar.header(n, len(b)) + b + bytes(tar.padding(len(b))) for n, b, _, _ in members(v))))
vector("member-dotdot.lwb", "a member named ../evil", err("UnsafePathError", "open", path="../evil"))(
    lwb(lambda v: archive([("../evil", b"x", b"0", ""), *members(v)])))
vector("member-absolute.lwb", "a member named /tmp/evil", err("UnsafePathError", "open", path="/tmp/evil"))(
    lwb(lambda v: archive([("/tmp/evil", b"x", b"0", ""), *members(v)])))
vector("member-subdir.lwb", "a member inside a directory", err("UnsafePathError", "open", path="sub/manifest.json"))(
    lwb(lambda v: archive([("sub/manifest.json", b"{}", b"0", ""), *members(v)])))
vector("symlink-member.lwb", "the weights member is a symbolic link to /etc/passwd",
       err("UnsafePathError", "open", path=WEIGHTS))(
    lwb(lambda v: archive([(WEIGHTS, b"", b"2", "/etc/passwd"), *members(v)[1:]])))
vector("hardlink-member.lwb", "a hard link member", err("UnsafePathError", "open", path=WEIGHTS))(
    lwb(lambda v: archive([(WEIGHTS, b"", b"1", MANIFEST), *members(v)[1:]])))
vector("device-member.lwb", "a character device member", err("UnsafePathError", "open", path="null"))(
    lwb(lambda v: archive([*members(v), ("null", b"", b"3", "")])))
vector("duplicate-member.lwb", "manifest.json twice", err("UnsafePathError", "open", path=MANIFEST))(
    lwb(lambda v: archive([*members(v), members(v)[-1]])))
vector("pax-header.lwb", "a pax extended header", err("BundleFormatError", "open", path="PaxHeader"))(
    lwb(lambda v: archive([("PaxHeader", b"18 path=evil.txt\n", b"x", ""), *members(v)])))
vector("bomb-declared.lwb", "a 30-byte frame declaring 1 TiB of content",
       err("BundleLimitError", "open", limit="MAX_TAR_BYTES"))(lwb(lambda v: declared_bomb()))
vector("bomb-expanding.lwb", "a member of 80 MiB of NULs in a few KiB, no declared size",
       err("BundleLimitError", "open", path=WEIGHTS, limit="MAX_RATIO"))(lwb(expanding_bomb))


def noncanonical(valid: Path) -> bytes:
    def reverse(v):
        if isinstance(v, dict):
            return {k: reverse(v[k]) for k in sorted(v, reverse=True)}
        return [reverse(x) for x in v] if isinstance(v, list) else v

    return (json.dumps(reverse(manifest_of(valid)), indent=2) + "\n").encode()


RAW = {
    "noncanonical-manifest": noncanonical,
    "duplicate-key": lambda v: (v / MANIFEST).read_bytes().replace(b'{"base":', b'{"name":"a/b","base":', 1),
    "nan": lambda v: (v / MANIFEST).read_bytes().replace(b'"alpha":2.0', b'"alpha":NaN', 1),
}


def digest_vectors(world: World) -> dict:
    samples = {
        "f32_2x3": torch.tensor([[0.0, -1.5, 2.25], [1e-3, 3.0e38, -0.0]], dtype=torch.float32),
        "bf16_3": torch.tensor([1.0, -2.0, 0.5], dtype=torch.bfloat16),
        "i64_scalar": torch.tensor(-7, dtype=torch.int64),
        "f16_empty": torch.zeros(0, 4, dtype=torch.float16),
        "bool_4": torch.tensor([True, False, False, True]),
    }
    tensors = {
        name: {"dtype": dtype_name(t.dtype), "shape": list(t.shape), "bytes": bytes(tensor_bytes(t)).hex(),
               "digest": tensor_digest(t)}
        for name, t in samples.items()
    }  # fmt: skip
    block = {n: samples[n] for n in ("f32_2x3", "bf16_3", "i64_scalar")}
    from lwformat.world.digest import block_digest_raw

    blocks = {"tensors": sorted(block), "digest": "sha256:" + block_digest_raw(block).hex()}
    tiny = world_digests(world, recompute=True)
    tiny_tensors = {path: sorted(base_tensors(b.module)) for path, b in world.blocks().items()}
    return {"tensors": tensors, "block": blocks,
            "tiny_world": {"root": tiny["root"], "blocks": tiny["blocks"], "tensor_names": tiny_tensors}}  # fmt: skip


def main(out: Path = HERE) -> None:
    out.mkdir(parents=True, exist_ok=True)
    valid = out / "valid-dir"
    for path, *_ in VECTORS:
        _rm(out / path)
    write_bundle(tiny_custom_world(), valid, name="lightworlds/tiny-noir", version="1.0.0",
                 description="Test vector: LoRA rank 2 on every Linear of the tiny world.",
                 license="Apache-2.0", tags=["vector"], provenance={"made_by": "spec/vectors/make_vectors.py"},
                 chunk_size=CHUNK)  # fmt: skip
    index = []
    for path, about, expect, options, make in VECTORS:
        if path in RAW:
            shutil.copytree(valid, out / path)
            (out / path / MANIFEST).write_bytes(RAW[path](valid))
        elif make is not None:
            make(out / path, valid)
        reuse = options.pop("reuse", None)
        index.append({"name": path, "path": reuse or path, "about": about, "expect": expect, **options})
        options["reuse"] = reuse
    (out / "index.json").write_text(json.dumps({"format": "lwbundle-vectors/1", "world": "make_vectors.tiny_world()",
                                                "vectors": index}, indent=2) + "\n")  # fmt: skip
    (out / "digests.json").write_text(json.dumps(digest_vectors(tiny_world()), indent=2) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE)
