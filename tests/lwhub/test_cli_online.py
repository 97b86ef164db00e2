"""The online verbs of `lwhub`, run in-process against a real registry on a loopback port.

Settings come only from this module's home (LWHUB_HOME, LWHUB_CACHE) and the flags;
accounts are made with the CLI on the live registry's data directory.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import lwhub
from lwformat import Block, LightConfig, World
from lwformat.bundle.keys import load_private_key
from lwformat.bundle.read import Bundle
from lwformat.bundle.signing import sign_bundle, verify_signature
from lwformat.bundle.write import write_bundle
from lwhub import cli
from lwhub.errors import BadRequestError
from lwhub.server.run import free_port

DEAD_URL = "http://127.0.0.1:9"  # the discard port: nothing answers


def run(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys, *argv) -> tuple[int, dict]:
    code, out, _ = run(capsys, *argv, "--json")
    return code, json.loads(out)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def adapter_bundle(dest: Path, name: str, version: str, key: Path | None, *, adapter_seed: int, rank: int = 4,
                   description: str = "") -> Path:  # fmt: skip
    """A real bundle of one LoRA slot on one fixed base (seed 0), adapters drawn from `adapter_seed`."""
    torch.manual_seed(0)
    world = World.from_blocks({"author/narrate/text/llm": Block(nn.Sequential(nn.Linear(32, 32)), "llm")})
    world.customize(LightConfig(rank=rank))
    torch.manual_seed(adapter_seed)
    for p in world.parameters():
        if p.requires_grad:
            nn.init.normal_(p)  # LoRA's B starts at zero: fill it so the delta is not zero
    write_bundle(world, dest, name=name, version=version, description=description)
    if key is not None:
        sign_bundle(dest, load_private_key(key))
    return dest


@pytest.fixture(scope="module", autouse=True)
def home(tmp_path_factory):
    """This module's settings: a config home and a cache of its own, nothing from the environment."""
    root = tmp_path_factory.mktemp("cli-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LWHUB_HOME", str(root / "config"))
        mp.setenv("LWHUB_CACHE", str(root / "cache"))
        mp.delenv("LWHUB_URL", raising=False)
        mp.delenv("LWHUB_TOKEN", raising=False)
        yield root


@pytest.fixture(scope="module")
def carol(hub, home) -> Path:
    """The account cli-carol, logged in, with a key pair made by `keygen --register`: returns the key directory."""
    with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.redirect_stderr(io.StringIO()):
        assert cli.main(["account", "create", "cli-carol", "--data", str(hub.data)]) == 0
        token = out.getvalue().strip()
        assert cli.main(["login", "--url", hub.url, "--token", token]) == 0
        assert cli.main(["keygen", "--out", str(home), "--name", "carol", "--register"]) == 0
    return home


def test_account_token_and_login(hub, home, capsys, monkeypatch):
    code, out, err = run(capsys, "account", "create", "cli-bob", "--data", hub.data)
    token = out.strip()
    assert code == 0 and token.startswith("lwh_") and "shown once" in err and token not in err
    code, out, err = run(capsys, "login", "--url", hub.url, "--token", token)
    assert code == 0 and "logged in as cli-bob" in out and token not in out
    config = home / "config" / "config.json"
    assert json.loads(config.read_text()) == {"url": hub.url, "token": token}
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    code, who = run_json(capsys, "whoami")  # the URL and the token come from the saved login
    assert code == 0 and who["account"] == "cli-bob" and who["scopes"] == ["cli-bob"] and who["url"] == hub.url

    code, made = run_json(capsys, "token", "create", "cli-bob", "--data", hub.data, "--scope", "cli-bob/one", "--ttl", 3600)
    assert code == 0 and made["scopes"] == ["cli-bob/one"] and made["expires"] > 0
    with monkeypatch.context() as env:
        env.setenv("LWHUB_TOKEN", made["token"])  # the environment wins over the saved login
        code, who = run_json(capsys, "whoami")
        assert code == 0 and who["scopes"] == ["cli-bob/one"]
        code, asked = run_json(capsys, "token", "create", "--scope", "cli-bob/one", "--ttl", 60)  # from the hub
        assert code == 0 and asked["account"] == "cli-bob" and asked["token"] != made["token"]
        code, out, err = run(capsys, "token", "create", "--scope", "cli-bob")  # wider than the token's own scope
        assert code == 8 and "cli-bob" in err and "hint:" in err

    code, out, err = run(capsys, "account", "create", "cli-bob", "--data", hub.data)
    assert code == 9 and "exists" in err and "hint: account names are taken once" in err and "--version" not in err
    code, out, err = run(capsys, "token", "create", "cli-nobody", "--data", hub.data)
    assert code == 4 and "cli-nobody" in err


def test_a_bad_token_is_refused_and_not_saved(hub, home, capsys):
    config = home / "config" / "config.json"
    before = config.read_bytes() if config.exists() else None
    code, _, err = run(capsys, "login", "--url", hub.url, "--token", "lwh_" + "x" * 43)
    assert code == 8 and "unknown token" in err and "lwhub login --token" in err
    assert (config.read_bytes() if config.exists() else None) == before
    code, _, err = run(capsys, "whoami", "--url", DEAD_URL)
    assert code == 10 and "cannot reach" in err and "--url" in err


def test_a_malformed_token_is_a_usage_error_that_never_shows_it(hub, home, capsys, monkeypatch):
    """A token file edited on Windows (a stray CR), a trailing space, a non-ASCII character."""
    token = run(capsys, "account", "create", "cli-frank", "--data", hub.data)[1].strip()
    config = home / "config" / "config.json"
    before = config.read_bytes() if config.exists() else None
    for bad in (token + "\r", token + " ", "lwh_\u00e9"):
        with monkeypatch.context() as env:
            env.setenv("LWHUB_TOKEN", bad)
            code, out, err = run(capsys, "whoami", "--url", hub.url, "--json")
        error = json.loads(out)["error"]
        assert code == 2 and error["type"] == "UsageError" and "malformed" in error["message"], repr(bad)
        assert token not in out + err and "Traceback" not in err, repr(bad)
        code, out, err = run(capsys, "login", "--url", hub.url, "--token", bad)
        assert code == 2 and "--token is malformed" in err and token not in out + err and "Traceback" not in err, repr(bad)
    assert (config.read_bytes() if config.exists() else None) == before  # nothing saved


@contextlib.contextmanager
def serving(handler):
    """A small stand-in server on loopback, in a thread, for faults the registry would not make."""
    import http.server
    import threading

    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def recording_server():
    """Another server on loopback that records the Authorization header of each request."""
    import http.server

    seen: list[str | None] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append(self.headers.get("Authorization"))
            self.send_response(404)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b'{"error": {"code": "not_found", "message": "nothing here"}}')

        def log_message(self, *args):
            pass

    with serving(Handler) as url:
        yield url, seen


@contextlib.contextmanager
def registry_that_refuses_keys(answer_keys: bool = True):
    """Another server on loopback: it knows the token (cli-carol's scopes) but cannot store a key (507),
    or, with answer_keys=False, takes the key and closes the connection without an answer."""
    import http.server

    class Handler(http.server.BaseHTTPRequestHandler):
        def answer(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            self.answer(200, {"account": "cli-carol", "scopes": ["cli-carol"], "expires": None})

        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if not answer_keys:
                self.close_connection = True
                return
            self.answer(507, {"error": {"code": "storage_error", "message": "the disk is full"}})

        def log_message(self, *args):
            pass

    with serving(Handler) as url:
        yield url


def test_keygen_register_leaves_no_key_the_hub_did_not_take(hub, carol, capsys, tmp_path, monkeypatch):
    code, _, err = run(capsys, "keygen", "--out", tmp_path, "--name", "k", "--register", "--owner", "alice")
    assert code == 8 and "'alice'" in err and list(tmp_path.iterdir()) == []
    code, _, _ = run(capsys, "keygen", "--out", tmp_path, "--name", "k", "--register", "--owner", "cli-carol", "--url", DEAD_URL)
    assert code == 10 and list(tmp_path.iterdir()) == []
    monkeypatch.setenv("LWHUB_TOKEN", "lwh_" + "x" * 43)
    with registry_that_refuses_keys() as url:
        code, _, err = run(capsys, "keygen", "--out", tmp_path, "--name", "k", "--register", "--url", url)
    assert code == 6 and "the disk is full" in err and list(tmp_path.iterdir()) == []
    assert run(capsys, "keygen", "--out", tmp_path, "--name", "k")[0] == 0  # the name is still free for a retry
    with registry_that_refuses_keys(answer_keys=False) as url:  # the key may be registered: its private half stays
        code, _, err = run(capsys, "keygen", "--out", tmp_path, "--name", "q", "--register", "--url", url)
    assert code == 10 and f"lwhub key register {tmp_path / 'q.pub'} --owner cli-carol" in err
    assert (tmp_path / "q.pem").is_file() and (tmp_path / "q.pub").is_file()


def test_the_saved_token_goes_only_to_the_registry_it_was_saved_for(hub, carol, capsys, monkeypatch):
    """A login for one hub is not sent to another named by --url or LWHUB_URL."""
    with recording_server() as (other, seen):
        _, _, err = run(capsys, "search", "noir", "--url", other)
        assert f"the saved login is for {hub.url}, not sent to {other}" in err
        with monkeypatch.context() as env:
            env.setenv("LWHUB_URL", other + "/")
            run(capsys, "info", "cli-carol/none")
            _, _, err = run(capsys, "trust", "list")  # offline: nothing is sent anywhere, nothing to say
            assert "saved login" not in err
        assert len(seen) == 2 and seen == [None, None]
    code, who = run_json(capsys, "whoami", "--url", hub.url + "/")  # the saved registry, spelled with a slash
    assert code == 0 and who["account"] == "cli-carol"
    with monkeypatch.context() as env:
        env.setenv("LWHUB_URL", hub.url)  # the saved registry, named by the environment
        code, who = run_json(capsys, "whoami")
        assert code == 0 and who["account"] == "cli-carol"


def test_keygen_register_then_push_and_pull(hub, carol, capsys, tmp_path):
    code, listed = run_json(capsys, "key", "list", "cli-carol")
    assert code == 0 and len(listed["keys"]) == 1
    folder = adapter_bundle(tmp_path / "noir", "cli-carol/noir", "1.0.0", carol / "carol.pem", adapter_seed=1)
    code, out, _ = run(capsys, "push", folder)
    assert code == 0 and "pushed cli-carol/noir@1.0.0" in out
    assert f"sha256:{sha256(folder / 'manifest.json')}" in out
    assert listed["keys"][0]["key_id"] in out  # the registered key signed it

    code, pinned = run_json(capsys, "trust", "list")  # `keygen --register` pinned the publisher's own key here
    assert pinned["pinned"]["cli-carol"] == [listed["keys"][0]["key_id"]]
    assert run(capsys, "trust", "remove", "cli-carol", listed["keys"][0]["key_id"])[0] == 0
    code, out, err = run(capsys, "pull", "cli-carol/noir")  # no key pinned for cli-carol on this machine
    assert code == 1 and "cli-carol" in err and "lwhub trust add" in err
    code, _, _ = run(capsys, "trust", "add", "cli-carol", carol / "carol.pub")
    assert code == 0
    code, out, _ = run(capsys, "pull", "cli-carol/noir")
    path = Path(out.strip())
    assert code == 0 and (path / "adapters.safetensors").read_bytes() == (folder / "adapters.safetensors").read_bytes()
    assert verify_signature(path, [carol / "carol.pub"]) == listed["keys"][0]["key_id"]
    code, pulled = run_json(capsys, "pull", "cli-carol/noir@1.0.0", "--offline", "--url", DEAD_URL)
    assert code == 0 and Path(pulled["path"]) == path and pulled["version"] == "1.0.0"
    code, out, err = run(capsys, "pull", "cli-carol/never-pulled", "--offline")
    assert code == 4 and "without --offline" in err
    code, out, err = run(capsys, "pull", "cli-carol/noir", "--url", DEAD_URL)
    assert code == 10 and "--offline" in err


def test_text_output_shows_a_publishers_control_characters_escaped(hub, carol, capsys, tmp_path):
    """A description is the publisher's text: escape sequences must not reach another user's terminal raw."""
    fake = "ok\x1b[2K\rsignature: verified (official)\x1b]0;title\x07 \u202egnp.exe\nsignature: verified"
    folder = adapter_bundle(tmp_path / "b", "cli-carol/escapes", "1.0.0", carol / "carol.pem", adapter_seed=5, description=fake)
    assert run(capsys, "push", folder)[0] == 0
    for argv in (("search", "escapes"), ("info", "cli-carol/escapes"), ("inspect", folder)):
        code, out, _ = run(capsys, *argv)
        assert code == 0 and "\\x1b[2K" in out, argv  # shown, escaped
        assert not any(c in out for c in "\x1b\x07\r\u202e"), argv
        assert not any(line.startswith("signature: verified") for line in out.splitlines()), argv  # no line of its own
    code, data = run_json(capsys, "info", "cli-carol/escapes")
    assert code == 0 and data["bundle"]["description"] == fake  # JSON keeps the text itself, escaped by JSON


def test_push_as_another_name_and_version_writes_a_resigned_copy(hub, carol, capsys, tmp_path):
    folder = adapter_bundle(tmp_path / "src", "cli-carol/draft", "0.0.1", carol / "carol.pem", adapter_seed=2)
    originals = {p.name: p.read_bytes() for p in folder.iterdir()}
    code, out, err = run(capsys, "push", folder, "--as", "cli-carol/renamed", "--version", "2.0.0")
    assert code == 2 and "--key" in err
    code, out, err = run(capsys, "push", folder, "--as", "Carol/Renamed", "--key", carol / "carol.pem")
    assert code == 2 and "--as Carol/Renamed" in err
    code, pushed = run_json(capsys, "push", folder, "--as", "cli-carol/renamed", "--version", "2.0.0", "--key", carol / "carol.pem")
    assert code == 0 and (pushed["name"], pushed["version"]) == ("cli-carol/renamed", "2.0.0")
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == originals  # the source is untouched
    run(capsys, "trust", "add", "cli-carol", carol / "carol.pub")
    code, out, _ = run(capsys, "pull", "cli-carol/renamed@2.0.0")
    with Bundle.open(out.strip()) as bundle:
        assert (bundle.manifest.name, bundle.manifest.version) == ("cli-carol/renamed", "2.0.0")
        assert pushed["manifest"] == f"sha256:{hashlib.sha256(bundle.manifest_bytes).hexdigest()}"
        assert (bundle.path / "adapters.safetensors").read_bytes() == originals["adapters.safetensors"]
    unsigned = adapter_bundle(tmp_path / "unsigned", "cli-carol/unsigned", "1.0.0", None, adapter_seed=3)
    code, out, err = run(capsys, "push", unsigned)
    assert code == 2 and "not signed" in err
    code, out, _ = run(capsys, "push", unsigned, "--key", carol / "carol.pem")
    assert code == 0 and (unsigned / "bundle.sig").is_file() and "pushed cli-carol/unsigned@1.0.0" in out
    code, out, err = run(capsys, "push", unsigned)  # the same signed bundle again: a retry, answered by its record
    assert code == 0 and "pushed cli-carol/unsigned@1.0.0" in out
    other = adapter_bundle(tmp_path / "other", "cli-carol/unsigned", "1.0.0", carol / "carol.pem", adapter_seed=4)
    code, out, err = run(capsys, "push", other)  # versions are immutable
    assert code == 9 and "new --version" in err and "account" not in err  # the hint fits a version, not an account


def test_search_info_yank_and_tag(hub, carol, capsys, tmp_path):
    for i, version in enumerate(["1.0.0", "1.1.0"]):
        folder = adapter_bundle(tmp_path / version, "cli-carol/rain", version, carol / "carol.pem", adapter_seed=10 + i,
                                description="rainy neon streets")  # fmt: skip
        assert run(capsys, "push", folder)[0] == 0
    code, found = run_json(capsys, "search", "neon street")
    assert code == 0 and [b["name"] for b in found["bundles"]] == ["cli-carol/rain"]
    assert found["bundles"][0]["latest"] == "1.1.0" and found["bundles"][0]["versions"] == 2
    code, _, _ = run(capsys, "yank", "cli-carol/rain@1.1.0", "--reason", "wrong colours")
    assert code == 0
    code, info = run_json(capsys, "info", "cli-carol/rain")
    yanked = {v["version"]: (v["yanked"], v["yank_reason"]) for v in info["versions"]}
    assert code == 0 and yanked == {"1.0.0": (False, ""), "1.1.0": (True, "wrong colours")}
    assert info["bundle"]["latest"] == "1.0.0"
    code, out, _ = run(capsys, "info", "cli-carol/rain")
    assert "yanked: wrong colours" in out
    assert run(capsys, "tag", "cli-carol/rain", "stable", "1.0.0")[0] == 0
    code, _, err = run(capsys, "tag", "cli-carol/rain", "latest", "1.0.0")
    assert code == 2 and "'latest' is not a tag to set" in err and "lowercase" not in err and "lwhub tag --help" in err
    with lwhub.from_env() as client, pytest.raises(BadRequestError) as refused:  # the hub's answer, through the API
        client.set_tag("cli-carol/rain", "latest", "1.0.0")
    assert "cannot be set" in str(refused.value) and "semver" not in cli.exit_code(refused.value)[1]
    assert run(capsys, "yank", "cli-carol/rain@1.1.0", "--undo")[0] == 0
    code, info = run_json(capsys, "info", "cli-carol/rain")
    assert info["bundle"]["latest"] == "1.1.0" and info["bundle"]["named_tags"] == {"stable": "1.0.0"}
    code, out, err = run(capsys, "yank", "cli-carol/rain")
    assert code == 2 and "exact version" in err


def test_not_found_forbidden_and_json_errors(hub, carol, capsys, tmp_path):
    code, out, err = run(capsys, "info", "cli-carol/nope")
    assert code == 4 and "no bundle cli-carol/nope" in err and "lwhub search" in err
    code, out, _ = run(capsys, "pull", "cli-carol/nope", "--json")
    assert code == 4 and json.loads(out)["error"]["code"] == "bundle_not_found"
    folder = adapter_bundle(tmp_path / "b", "alice/not-carols", "1.0.0", carol / "carol.pem", adapter_seed=4)
    code, out, err = run(capsys, "push", folder)
    assert code == 8 and "alice" in err and "--scope" in err
    code, out, _ = run(capsys, "push", folder, "--json", "--url", hub.url)
    assert code == 8 and json.loads(out)["error"]["code"] == "namespace_forbidden"
    code, out, err = run(capsys, "pull", "Not A Ref")
    assert code == 2 and "owner/name" in err


def _delta(bundle: Bundle) -> torch.Tensor:
    """s · B @ A of the bundle's one LoRA slot, from its stored tensors and manifest (s = alpha / rank)."""
    (slot,) = bundle.manifest.slots
    t = bundle.slot_tensors(slot.slot)
    return slot.alpha / slot.rank * (t["lora_B"].double() @ t["lora_A"].double())  # (out, in)


def test_blend_pulls_blends_signs_and_pushes_with_parents(hub, carol, capsys, tmp_path):
    run(capsys, "trust", "add", "cli-carol", carol / "carol.pub")
    parents = {}
    for name, seed in [("cli-carol/sky", 20), ("cli-carol/sea", 21)]:
        parents[name] = adapter_bundle(tmp_path / name.split("/")[1], name, "1.0.0", carol / "carol.pem", adapter_seed=seed)
        assert run(capsys, "push", parents[name])[0] == 0
    argv = ["blend", "cli-carol/sky:0.7", "cli-carol/sea@1.0.0:0.3", "--method", "svd", "--rank", "4", "--as", "cli-carol/sky-sea"]
    code, out, err = run(capsys, *argv)  # no --key: refused before anything is pulled
    assert code == 2 and "--key" in err
    code, out, err = run(capsys, "blend", "cli-carol/sky:lots", "--no-push")
    assert code == 2 and "REF[:WEIGHT]" in err
    code, made = run_json(capsys, *argv, "--key", carol / "carol.pem")
    assert code == 0 and made["pushed"]["name"] == "cli-carol/sky-sea" and made["signed"]

    code, out, _ = run(capsys, "pull", "cli-carol/sky-sea@0.1.0")
    sky_dir, sea_dir = parents["cli-carol/sky"], parents["cli-carol/sea"]
    with Bundle.open(out.strip()) as blended, Bundle.open(sky_dir) as sky, Bundle.open(sea_dir) as sea:
        recorded = [(p.name, p.version, p.weight, p.manifest_sha256) for p in blended.manifest.parents]
        assert recorded == [("cli-carol/sky", "1.0.0", 0.7, sha256(sky.path / "manifest.json")),
                            ("cli-carol/sea", "1.0.0", 0.3, sha256(sea.path / "manifest.json"))]  # fmt: skip
        exact = 0.7 * _delta(sky) + 0.3 * _delta(sea)  # (32, 32), rank 8: re-ranked to 4, so not exact
        error = torch.linalg.norm(_delta(blended) - exact) / torch.linalg.norm(exact)
        assert blended.manifest.slots[0].rank == 4 and 0 < error.item() < 1
        assert made["relative_error"] == pytest.approx(error.item(), rel=1e-4)
    text = run(capsys, *argv, "--version", "0.2.0", "--key", carol / "carol.pem")[1]
    assert f"{made['relative_error']:.3e}" in text and "lossy: --method linear blends exactly" in text
    code, made = run_json(capsys, "blend", "cli-carol/sky:0.5", "cli-carol/sea:0.5", "--method", "linear", "--as",
                          "cli-carol/even", "--no-push", "--out", tmp_path / "even")  # fmt: skip
    assert code == 0 and made["pushed"] is None and made["relative_error"] == 0.0
    assert not (tmp_path / "even" / "bundle.sig").exists() and (tmp_path / "even" / "manifest.json").is_file()


def test_blend_refuses_an_output_that_exists_before_any_pull(hub, carol, capsys, tmp_path, monkeypatch):
    run(capsys, "trust", "add", "cli-carol", carol / "carol.pub")
    for name, seed in [("cli-carol/dawn", 22), ("cli-carol/dusk", 23)]:
        folder = adapter_bundle(tmp_path / name.split("/")[1], name, "1.0.0", carol / "carol.pem", adapter_seed=seed)
        assert run(capsys, "push", folder)[0] == 0
    monkeypatch.chdir(tmp_path)
    (tmp_path / "taken").mkdir()
    (tmp_path / "mine-0.1.0").mkdir()
    parts = ["blend", "cli-carol/dawn:0.5", "cli-carol/dusk:0.5", "--method", "linear", "--no-push"]
    for where in (["--out", "taken"], ["--as", "cli-carol/mine"]):  # the second: ./NAME-VERSION, the default --out
        code, _, err = run(capsys, *parts, *where, "--url", DEAD_URL)  # nothing answers there: refused before any pull
        assert code == 2 and "already exists" in err and "hint:" in err, where
    code, made = run_json(capsys, *parts)  # named after its parents: known only once blended
    assert code == 0 and Path(made["saved"]).is_dir()
    code, _, err = run(capsys, *parts)  # the same blend again: the same name, now taken
    assert code == 2 and "already exists" in err and "never overwritten" in err


def test_pull_draws_a_progress_bar_only_on_a_terminal(hub, carol, capsys, tmp_path, monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    folder = adapter_bundle(tmp_path / "bar", "cli-carol/bar", "1.0.0", carol / "carol.pem", adapter_seed=30)
    assert run(capsys, "push", folder)[0] == 0
    monkeypatch.setenv("LWHUB_CACHE", str(tmp_path / "fresh-cache"))  # an empty cache: the download happens
    run(capsys, "trust", "add", "cli-carol", carol / "carol.pub")
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert cli.main(["pull", "cli-carol/bar"]) == 0
    size = (folder / "adapters.safetensors").stat().st_size
    assert "pull cli-carol/bar" in terminal.getvalue() and "100%" in terminal.getvalue()
    assert f"{size / 1e6:.1f}/{size / 1e6:.1f} MB" in terminal.getvalue()
    monkeypatch.setenv("LWHUB_CACHE", str(tmp_path / "quiet-cache"))
    run(capsys, "trust", "add", "cli-carol", carol / "carol.pub")
    quiet = Terminal()
    monkeypatch.setattr(sys, "stderr", quiet)
    assert cli.main(["pull", "cli-carol/bar", "--quiet"]) == 0 and quiet.getvalue() == ""


def test_public_api_is_pinned():
    assert lwhub.__all__ == sorted(lwhub.__all__) == ["Client", "from_env", "pull"]
    from lwhub.client import Client, from_env, pull

    assert (lwhub.Client, lwhub.from_env, lwhub.pull) == (Client, from_env, pull)


def test_the_installed_console_script_runs():
    command = [shutil.which("lwhub")] if shutil.which("lwhub") else [sys.executable, "-m", "lwhub"]
    done = subprocess.run([*command, "--help"], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert all(v in done.stdout for v in ("push", "pull", "blend", "login", "trust", "exit codes"))


def test_serve_runs_a_hub_until_interrupted(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LWHUB_HOME", str(tmp_path / "home"))  # this login is not the module's
    data, port = tmp_path / "data", free_port()
    code, out, err = run(capsys, "account", "create", "dana", "--data", data)  # bootstrap, before the hub runs
    token = out.strip()
    assert code == 0 and f"no registry was at {data}: a new one is made there" in err
    assert "a new one" not in run(capsys, "account", "create", "erin", "--data", data)[2]  # it is there now
    url = f"http://127.0.0.1:{port}"
    code, out, err = run(capsys, "serve", "--data", data, "--port", port, "--upload-idle", "0")
    assert code == 2 and "seconds above 0" in err and "serving" not in err
    (tmp_path / "a-file").write_text("")
    code, _, err = run(capsys, "serve", "--data", tmp_path / "a-file" / "data", "--port", port)  # cannot be made
    assert code == 7 and "a-file" in err and "serving" not in err
    for bad in ("70000", "-5"):
        code, out, err = run(capsys, "serve", "--data", data, "--port", bad, "--json")
        assert code == 2 and json.loads(out)["error"]["type"] == "UsageError" and "0 to 65535" in out and "serving" not in err, bad
    code, out, _ = run(capsys, "serve", "--data", data, "--host", "nonexistent.invalid", "--port", "0", "--json")
    assert code == 2 and json.loads(out)["error"]["type"] == "UsageError" and "nonexistent.invalid" in out
    server = subprocess.Popen([sys.executable, "-m", "lwhub", "serve", "--data", str(data), "--port", "0", "--json", "--upload-idle", "30"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    try:
        announced = json.loads(server.stdout.readline())  # --json: where it listens, once ready; port 0 named
        url = announced["url"]
        assert announced["data"] == str(data.resolve()) and re.fullmatch(r"http://127\.0\.0\.1:[1-9][0-9]*", url), announced
        deadline = time.monotonic() + 60  # the child imports torch before it listens
        while (code := run(capsys, "login", "--url", url, "--token", token)[0]) == 10 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert code == 0
        code, who = run_json(capsys, "whoami")
        assert code == 0 and who["account"] == "dana" and who["url"] == url
        code, _, err = run(capsys, "serve", "--data", data, "--port", free_port())  # that registry holds the lock
        assert code == 2 and "another registry serves" in err and "serving" not in err
    finally:
        server.send_signal(signal.SIGINT)
        out, err = server.communicate(timeout=30)
    assert server.returncode == 0 and f"serving {data} at {url}" in err and out == ""  # one document, printed above


def test_pinned_keys_live_with_the_login_not_in_the_cache(carol, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("LWHUB_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("LWHUB_CACHE", str(tmp_path / "cache"))
    assert run(capsys, "trust", "add", "cli-carol", carol / "carol.pub")[0] == 0
    assert list((tmp_path / "home" / "trust" / "cli-carol").glob("*.pub"))
    monkeypatch.setenv("LWHUB_CACHE", str(tmp_path / "another-cache"))  # clearing the cache keeps the pins
    from lwformat.bundle.keys import key_id, load_public_key

    code, data = run_json(capsys, "trust", "list", "cli-carol")
    assert code == 0 and data["pinned"] == {"cli-carol": [key_id(load_public_key(carol / "carol.pub"))]}
