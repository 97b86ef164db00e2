"""The offline verbs of `lwhub`, run on real bundles, keys and saved worlds."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from lwformat import LightConfig
from lwformat.bundle.archive import pack
from lwformat.bundle.write import write_bundle
from lwformat.zoo import reference_world
from lwhub import cli

NAME = "test/noir"


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> Path:
    """A saved base world, an unsigned bundle made on it, and a key pair."""
    root = tmp_path_factory.mktemp("cli")
    world = reference_world("tiny", seed=0)
    world.save(root / "world")
    reference_world("tiny", seed=1).save(root / "other-world")
    world.customize(LightConfig(rank=2, blocks=["author/**"]))
    write_bundle(world, root / "bundle", name=NAME, version="1.2.0")
    assert cli.main(["keygen", "--out", str(root)]) == 0
    return root


@pytest.fixture
def bundle(made, tmp_path) -> Path:
    copy = tmp_path / "bundle"
    shutil.copytree(made / "bundle", copy)
    return copy


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_keygen_writes_a_private_pair_and_never_overwrites(tmp_path, capsys):
    code, out, _ = run(capsys, "keygen", "--out", tmp_path, "--name", "alice", "--json")
    data = json.loads(out)
    assert code == 0 and Path(data["private"]) == tmp_path / "alice.pem" and len(data["key_id"]) == 64
    assert stat.S_IMODE((tmp_path / "alice.pem").stat().st_mode) == 0o600
    code, _, err = run(capsys, "keygen", "--out", tmp_path, "--name", "alice")
    assert code == 2 and "already exists" in err


def test_sign_then_verify(bundle, made, capsys):
    code, out, _ = run(capsys, "sign", bundle, "--key", made / "lwhub.pem")
    assert code == 0 and (bundle / "bundle.sig").is_file() and f"signed {NAME}@1.2.0" in out
    code, out, _ = run(capsys, "verify", bundle, "--key", made / "lwhub.pub", "--json")
    data = json.loads(out)
    assert code == 0 and data["ok"] and data["signature_checked"] and data["name"] == NAME
    # The stock OpenSSF tool agrees (spec/signature.md).
    stock = [sys.executable, "-m", "model_signing", "verify", "key", str(bundle),
             "--signature", str(bundle / "bundle.sig"), "--public_key", str(made / "lwhub.pub")]  # fmt: skip
    assert subprocess.run(stock, capture_output=True, timeout=60).returncode == 0


def test_verify_without_a_key_checks_the_keys_pinned_for_the_owner(bundle, made, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LWHUB_HOME", str(tmp_path / "home"))
    code, out, _ = run(capsys, "verify", bundle)
    assert code == 0 and "signature: none: the bundle is unsigned" in out
    run(capsys, "sign", bundle, "--key", made / "lwhub.pem")
    code, out, _ = run(capsys, "verify", bundle)  # signed, nothing pinned for its owner "test": hashes only, and why
    assert code == 0 and "signature: present, not checked: no key is pinned for test" in out
    code, out, _ = run(capsys, "trust", "add", "test", made / "lwhub.pub", "--json")
    kid = json.loads(out)["key_id"]
    code, out, _ = run(capsys, "verify", bundle)
    assert code == 0 and f"signature: verified against the pinned key for test (key {kid})" in out
    code, out, _ = run(capsys, "verify", bundle, "--json")
    data = json.loads(out)
    assert data["signed"] and data["signature_checked"] and data["checked_with"] == "pinned" and data["key_id"] == kid
    run(capsys, "keygen", "--out", tmp_path, "--name", "mallory")
    run(capsys, "trust", "remove", "test", kid)
    run(capsys, "trust", "add", "test", tmp_path / "mallory.pub")  # the owner's only pinned key is another one
    code, _, err = run(capsys, "verify", bundle)
    assert code == 1 and "pinned for test" in err and str(tmp_path / "home" / "trust") in err


def test_version_prints_the_packages_version(capsys):
    import tomllib

    version = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())["project"]["version"]
    for argv, want in ((["--version"], f"lwhub {version}\n"), (["--version", "--json"], json.dumps({"version": version}) + "\n")):
        with pytest.raises(SystemExit) as info:
            cli.main(argv)
        assert info.value.code == 0 and capsys.readouterr().out == want, argv


def test_verify_fails_with_exit_1(bundle, made, tmp_path, capsys):
    code, _, err = run(capsys, "verify", bundle, "--key", made / "lwhub.pub")
    assert code == 1 and "not signed" in err and "hint:" in err
    run(capsys, "sign", bundle, "--key", made / "lwhub.pem")
    run(capsys, "keygen", "--out", tmp_path, "--name", "mallory")
    code, out, _ = run(capsys, "verify", bundle, "--key", tmp_path / "mallory.pub", "--json")
    assert code == 1 and json.loads(out)["error"]["type"] == "UntrustedSignatureError"
    weights = bundle / "adapters.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    code, out, _ = run(capsys, "verify", bundle, "--key", made / "lwhub.pub", "--json")
    assert code == 1 and json.loads(out)["error"] | {"message": ""} == {
        "type": "IntegrityError", "path": "adapters.safetensors", "message": "", "exit_code": 1,
    }  # fmt: skip


def test_sign_refuses_a_bundle_whose_files_changed(bundle, made, capsys):
    weights = bundle / "adapters.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0x40  # inside the last tensor: the header still parses, the hash differs
    weights.write_bytes(bytes(data))
    code, _, err = run(capsys, "sign", bundle, "--key", made / "lwhub.pem")
    assert code == 1 and "adapters.safetensors" in err
    assert not (bundle / "bundle.sig").exists()


def test_inspect_a_directory_and_an_archive(bundle, made, tmp_path, capsys):
    run(capsys, "sign", bundle, "--key", made / "lwhub.pem")
    code, out, _ = run(capsys, "inspect", bundle)
    assert code == 0 and f"{NAME}@1.2.0" in out and "author/narrate/text/llm:blocks.0.attn.qkv" in out
    assert "signature  present" in out
    archive = pack(bundle, tmp_path / "noir.lwb")
    code, out, _ = run(capsys, "inspect", archive, "--json")
    data = json.loads(out)
    assert code == 0 and data["manifest"]["name"] == NAME and data["signed"] is True
    assert {s["block"] for s in data["manifest"]["slots"]} == {"author/narrate/text/llm"}
    code, _, _ = run(capsys, "verify", archive, "--key", made / "lwhub.pub")
    assert code == 0


def test_check_against_the_right_and_a_wrong_world(bundle, made, capsys):
    code, out, _ = run(capsys, "check", bundle, "--world", made / "world", "--strict")
    assert code == 0 and "fits" in out
    code, out, _ = run(capsys, "check", bundle, "--world", made / "other-world", "--json")
    data = json.loads(out)
    assert code == 3 and not data["ok"]
    assert data["problems"][0]["path"] == "author/narrate/text/llm" and data["problems"][0]["outcome"] == "digest mismatch"


def test_check_verify_recomputes_the_worlds_digests(bundle, made, tmp_path, capsys):
    world = tmp_path / "world"
    shutil.copytree(made / "world", world)
    weights = world / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x10  # inside the last tensor: digests.json no longer describes the weights
    weights.write_bytes(bytes(data))
    code, _, _ = run(capsys, "check", bundle, "--world", world)
    assert code == 0  # by default the world's recorded digests are trusted, as World.load does
    code, _, err = run(capsys, "check", bundle, "--world", world, "--verify")
    assert code == 5 and "changed since `World.save` wrote it" in err
    code, out, _ = run(capsys, "check", bundle, "--world", world, "--verify", "--json")
    error = json.loads(out)["error"]
    assert code == 5 and error["type"] == "CheckpointError" and "does not match the recorded" in error["message"]
    code, out, _ = run(capsys, "check", bundle, "--world", made / "world", "--verify", "--json")
    assert code == 0 and json.loads(out)["world_verified"] is True


def test_not_found_usage_and_format_errors(bundle, made, tmp_path, capsys):
    code, _, err = run(capsys, "inspect", tmp_path / "nope")
    assert code == 4 and "no such bundle" in err
    code, _, _ = run(capsys, "check", bundle, "--world", tmp_path / "nope")
    assert code == 4
    code, _, err = run(capsys, "sign", bundle, "--key", tmp_path / "nope.pem")
    assert code == 4 and "nope.pem" in err
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "manifest.json").write_text("{not json")
    code, _, _ = run(capsys, "inspect", tmp_path / "junk")
    assert code == 5
    archive = pack(bundle, tmp_path / "b.lwb")
    code, _, err = run(capsys, "sign", archive, "--key", made / "lwhub.pem")
    assert code == 2 and "archive" in err
    with pytest.raises(SystemExit) as info:
        cli.main(["verify"])
    assert info.value.code == 2


def test_an_owner_name_that_is_not_one_is_a_usage_error(made, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LWHUB_HOME", str(tmp_path / "home"))
    for argv in (("trust", "list", "Author"), ("trust", "add", "../etc", made / "lwhub.pub"), ("trust", "remove", "Author", "0" * 64)):
        code, _, err = run(capsys, *argv)
        assert code == 2 and "is not an owner name" in err and "bug" not in err, argv


def test_every_exit_code_is_in_the_documented_table():
    documented = {int(line.split()[0]) for line in cli.__doc__.splitlines() if line[:6].strip().isdigit()}
    assert {code for _, code, _ in cli.EXIT_CODES} | {0, cli.INTERNAL, cli.INTERRUPTED, cli.PIPE_CLOSED} == documented


def test_python_dash_m_lwhub_runs(tmp_path):
    done = subprocess.run([sys.executable, "-m", "lwhub", "keygen", "--out", str(tmp_path), "--json"],
                          capture_output=True, text=True, timeout=60, cwd=Path(__file__).parents[2])  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert Path(json.loads(done.stdout)["public"]).is_file()


def test_a_version_past_twenty_digits_is_a_reference_error_not_a_crash(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LWHUB_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("LWHUB_CACHE", str(tmp_path / "cache"))
    for verb in ("pull", "yank"):
        code, out, err = run(capsys, verb, "alice/noir@" + "1" * 5000 + ".0.0", "--url", "http://127.0.0.1:9", "--json")
        assert code == 2 and json.loads(out)["error"]["type"] == "RefError" and "Traceback" not in err, verb


@pytest.mark.parametrize("argv", [("trust", "list"), ("verify", "no-such-bundle")], ids=["success", "error"])
def test_output_to_a_closed_pipe_exits_141(argv, tmp_path):
    """`lwhub ... --json | head -0`: the reader is gone before lwhub writes, an error report included."""
    reader, writer = os.pipe()
    os.close(reader)
    try:
        done = subprocess.run([sys.executable, "-m", "lwhub", *argv, "--json"], stdout=writer, stderr=subprocess.PIPE, text=True,
                              timeout=60, cwd=Path(__file__).parents[2], env=os.environ | {"LWHUB_HOME": str(tmp_path)}, check=False)  # fmt: skip
    finally:
        os.close(writer)
    assert done.returncode == cli.PIPE_CLOSED and "Traceback" not in done.stderr, done.stderr


def test_a_token_lifetime_is_checked_before_anything_is_written(tmp_path, capsys):
    for ttl in ("nan", "inf", "-1", "1e12"):
        code, out, err = run(capsys, "account", "create", "dave", "--data", tmp_path / "hub", "--ttl", ttl)
        assert code == 2 and "--ttl" in err and out == "", ttl
    assert not (tmp_path / "hub").exists()
    (tmp_path / "file").write_text("not a hub")
    code, _, err = run(capsys, "account", "create", "dave", "--data", tmp_path / "file")
    assert code == 2 and "a file; --data names the hub's data directory" in err
    code, out, _ = run(capsys, "account", "create", "dave", "--data", tmp_path / "hub", "--ttl", "3600")
    assert code == 0 and out.strip().startswith("lwh_")


def test_ordinary_mistakes_are_usage_errors_not_internal_ones(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LWHUB_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("LWHUB_CACHE", str(tmp_path / "cache"))
    code, _, err = run(capsys, "pull", "alice/b", "--url", "http://[::1")
    assert code == 2 and "not a URL" in err
    for url in ("localhost:8700", "ftp://x", "http://127.0.0.1:8700/v1"):
        code, _, err = run(capsys, "pull", "alice/b", "--url", url)
        assert code == 2 and ("http://" in err or "root URL" in err), url
        code, _, err = run(capsys, "pull", "alice/b", "--url", url, "--offline")  # offline, the URL is not used
        assert code == 4 and "without --offline" in err, url
    from lwhub.client import Client

    for url in ("HTTP://127.0.0.1:9", "https://gateway.example/registry/v1"):  # a proxy's path may end in /v1
        Client(url, cache_dir=tmp_path / "c").close()
    for argv in (("search", "--limit", "-1"), ("info", "alice/b", "--limit", "0")):
        with pytest.raises(SystemExit) as info:
            cli.main(list(argv))
        assert info.value.code == 2
        assert capsys.readouterr().out == ""
        with pytest.raises(SystemExit) as info:  # --json: one document on stdout, arguments argparse refused included
            cli.main([*argv, "--json"])
        error = json.loads(capsys.readouterr().out)["error"]
        assert info.value.code == 2 and error["type"] == "UsageError" and "--limit" in error["message"], argv
    for argv, want in ((("verify", "--js", "x"), 2), (("verify", "--", "--json"), 4)):  # no abbreviation; a positional after "--"
        try:
            code = cli.main(list(argv))
        except SystemExit as exit:
            code = exit.code
        assert code == want and capsys.readouterr().out == "", argv  # no JSON: --json was not given
    code, _, err = run(capsys, "login", "--url", "http://127.0.0.1:9", "--token", "nope")
    assert code == 2 and "starts with lwh_" in err
    config = tmp_path / "home" / "config.json"  # $LWHUB_HOME/config.json
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text('{"token": 5, "url": 7}')
    code, _, err = run(capsys, "whoami")
    assert code == 2 and "delete it and `lwhub login` again" in err
