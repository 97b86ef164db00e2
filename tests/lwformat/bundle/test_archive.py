"""The archive form: exact ustar headers, standard tools in both directions, safe unpacking."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tarfile

import msgspec
import pytest
import torch
import zstandard

from lwformat.bundle.archive import pack, unpack
from lwformat.bundle.manifest import SlotEntry, TensorEntry
from lwformat.bundle.read import Bundle
from lwformat.bundle.write import write_tensors
from lwformat.errors import BundleExistsError, BundleFormatError, BundleLimitError, UnsafePathError

from tests.lwformat.bundle.tiny import VECTORS, tree_bytes, write_tiny


def _gnu_tar_with_zstd() -> bool:
    if shutil.which("tar") is None or shutil.which("zstd") is None:
        return False
    return subprocess.run(["tar", "--help"], capture_output=True, text=True).stdout.count("--zstd") > 0


needs_tar = pytest.mark.skipif(not _gnu_tar_with_zstd(), reason="needs GNU tar with --zstd and the zstd program")


def test_archive_bytes_follow_the_spec(tmp_path):
    folder = write_tiny(tmp_path)
    pack(folder, tmp_path / "b.lwb")
    data = (tmp_path / "b.lwb").read_bytes()
    params = zstandard.get_frame_parameters(data)
    tar_bytes = zstandard.ZstdDecompressor().decompress(data)
    assert params.content_size == len(tar_bytes) and params.has_checksum and params.dict_id == 0
    sizes = {p.name: p.stat().st_size for p in folder.iterdir()}
    assert len(tar_bytes) == sum(512 + -(-s // 512) * 512 for s in sizes.values()) + 1024  # no record padding
    with tarfile.open(fileobj=io.BytesIO(tar_bytes), format=tarfile.USTAR_FORMAT) as archive:
        members = archive.getmembers()
        assert [m.name for m in members] == sorted(sizes)
        for m in members:
            assert (m.type, m.mode, m.uid, m.gid, m.uname, m.gname, m.mtime) == (tarfile.REGTYPE, 0o644, 0, 0, "", "", 0)
            assert m.pax_headers == {} and m.size == sizes[m.name]
            assert archive.extractfile(m).read() == (folder / m.name).read_bytes()
    first = tar_bytes[:512]
    assert first[257:265] == b"ustar\x0000" and first[100:108] == b"0000644\x00" and first[136:148] == b"0" * 11 + b"\x00"


@needs_tar
def test_gnu_tar_unpacks_our_archives(tmp_path):
    folder = write_tiny(tmp_path)
    pack(folder, tmp_path / "b.lwb")
    (tmp_path / "out").mkdir()
    subprocess.run(["tar", "--zstd", "-xf", str(tmp_path / "b.lwb"), "-C", str(tmp_path / "out")], check=True)
    assert tree_bytes(tmp_path / "out") == tree_bytes(folder)


@needs_tar
def test_we_open_archives_made_by_gnu_tar(tmp_path):
    folder = write_tiny(tmp_path)
    names = sorted(os.listdir(folder))
    subprocess.run(["tar", "--zstd", "--format=gnu", "-cf", str(tmp_path / "gnu.lwb"), "-C", str(folder), *names], check=True)
    with Bundle.open(tmp_path / "gnu.lwb") as bundle:
        assert tree_bytes(bundle.path) == tree_bytes(folder)


def test_unpack_is_all_or_nothing(tmp_path):
    # the bad member comes after good ones: manifest.json and adapters.safetensors are written first
    with pytest.raises(UnsafePathError):
        unpack(VECTORS / "device-member.lwb", tmp_path / "out")
    assert os.listdir(tmp_path) == []
    (tmp_path / "out").mkdir()
    with pytest.raises(BundleExistsError):
        unpack(VECTORS / "valid.lwb", tmp_path / "out")
    assert os.listdir(tmp_path / "out") == []
    unpack(VECTORS / "valid.lwb", tmp_path / "fresh")
    assert tree_bytes(tmp_path / "fresh") == tree_bytes(VECTORS / "valid-dir")


def test_pack_refuses_an_invalid_bundle_and_an_existing_target(tmp_path):
    folder = write_tiny(tmp_path)
    (tmp_path / "b.lwb").write_bytes(b"")
    with pytest.raises(BundleExistsError):
        pack(folder, tmp_path / "b.lwb")
    (folder / "stray.txt").write_text("not listed")
    with pytest.raises(BundleFormatError, match="does not list"):
        pack(folder, tmp_path / "c.lwb")
    assert not (tmp_path / "c.lwb").exists()


def test_pack_refuses_to_write_the_archive_into_the_bundle_it_packs(tmp_path):
    folder = write_tiny(tmp_path)
    before = tree_bytes(folder)
    for target in (folder / "b.lwb", tmp_path / "." / "b" / "b.lwb"):
        with pytest.raises(BundleFormatError, match="inside the bundle directory") as info:
            pack(folder, target)
        assert info.value.path == str(target)
    assert tree_bytes(folder) == before and os.listdir(tmp_path) == ["b"]
    Bundle.open(folder).close()


def test_pack_refuses_an_archive_readers_would_take_for_a_decompression_bomb(tmp_path):
    with Bundle.open(VECTORS / "valid-dir") as vector:
        draft = vector.manifest
    block, n = draft.slots[0].block, 18 << 18  # 18 MiB of zeros: past RATIO_FLOOR, and 1024 x what zstd makes of them
    zeros = SlotEntry(block=block, module="0", kind="bias", layer="linear",
                      tensors={"bias_delta": TensorEntry(key=f"{block}:0.bias_delta", dtype="F32", shape=[n])})  # fmt: skip
    folder = tmp_path / "b"
    write_tensors(msgspec.structs.replace(draft, slots=[zeros]), {f"{block}:0.bias_delta": torch.zeros(n)}, folder)
    with pytest.raises(BundleLimitError, match="decompression bomb; ship the bundle directory") as info:
        pack(folder, tmp_path / "b.lwb")
    assert info.value.limit == "MAX_RATIO"
    assert os.listdir(tmp_path) == ["b"]


@pytest.mark.parametrize("field, start", [("mode", 100), ("uid", 108), ("mtime", 136), ("devmajor", 329)])
def test_every_numeric_header_field_must_be_octal(tmp_path, field, start):
    """The spec: numeric fields MUST be octal; only size and chksum were read before."""
    from lwformat.bundle import tar

    block = bytearray(tar.header("manifest.json", 2))
    block[start : start + 3] = b"zz9"
    block[148:156] = b"%06o\x00 " % (sum(block[:148]) + 8 * 32 + sum(block[156:]))
    with pytest.raises(BundleFormatError, match=f"{field} .* is not octal"):
        tar.parse_header(bytes(block))


@pytest.mark.parametrize("damage", ["checksum", "mode"])
def test_a_bad_tar_header_names_the_archive_its_offset_and_the_member(tmp_path, damage):
    from lwformat.bundle import tar

    folder = write_tiny(tmp_path)
    pack(folder, tmp_path / "b.lwb")
    stream = bytearray(zstandard.ZstdDecompressor().decompress((tmp_path / "b.lwb").read_bytes()))
    first = (folder / "adapters.safetensors").stat().st_size
    at = 512 + first + tar.padding(first)  # the second header: bundle.sig is absent, so manifest.json's
    if damage == "checksum":
        stream[at + 148] ^= 1
    else:  # the checksum holds, so the member is known
        stream[at + 100 : at + 103] = b"zz9"
        stream[at + 148 : at + 156] = b"%06o\x00 " % (sum(stream[at : at + 148]) + 8 * 32 + sum(stream[at + 156 : at + 512]))
    (tmp_path / "bad.lwb").write_bytes(zstandard.ZstdCompressor(write_checksum=True).compress(bytes(stream)))
    with pytest.raises(BundleFormatError, match=f"^bad.lwb: tar header at byte {at:,}") as info:
        Bundle.open(tmp_path / "bad.lwb")
    named = damage == "mode"
    assert (info.value.path, info.value.field) == ("bad.lwb", "manifest.json" if named else None)
    assert ("(member manifest.json)" in str(info.value)) == named


def test_pack_and_unpack_sync_the_directory_their_rename_wrote(tmp_path, monkeypatch):
    """The rename that puts an archive or an unpacked bundle in place is synced to disk too;
    a failure there says the file is written, and leaves it."""
    import errno

    from lwformat.bundle import files

    synced, real = [], files.fsync_dir

    def record(path):
        synced.append(path)
        real(path)

    monkeypatch.setattr(files, "fsync_dir", record)
    archive = pack(VECTORS / "valid-dir", tmp_path / "b.lwb")
    unpack(archive, tmp_path / "out")
    assert synced.count(tmp_path) == 2  # once after each rename

    def fails(path):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(files, "fsync_dir", fails)
    with pytest.raises(OSError, match="written, but syncing its directory entry failed"):
        pack(VECTORS / "valid-dir", tmp_path / "c.lwb")
    assert (tmp_path / "c.lwb").is_file()
