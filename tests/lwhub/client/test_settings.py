"""Settings as the `lwhub` command has them: the saved login and the trust store reach the Python API too."""

from __future__ import annotations

import shutil

import pytest

import lwhub
from lwhub import cli
from lwhub.cli_config import save_config
from lwhub.client import Client, from_env
from lwhub.errors import RollbackError, TrustError, UsageError
from lwhub.trust import TrustStore

OTHER = "http://127.0.0.1:9"  # the discard port: a client is made, never used


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A settings home of this test's own, and no settings from the environment."""
    monkeypatch.setenv("LWHUB_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("LWHUB_CACHE", str(tmp_path / "cache"))
    for name in ("LWHUB_URL", "LWHUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path / "home"


def test_from_env_follows_the_saved_login_after_the_environment(home, hub, monkeypatch):
    save_config({"url": hub.url, "token": hub.token})  # what `lwhub login` writes
    with from_env() as client:
        assert (client.url, client.token) == (hub.url, hub.token)
        assert client.whoami().account == "alice"
    with from_env(url=OTHER) as client:  # another hub: the login's token stays home
        assert (client.url, client.token) == (OTHER, None)
    monkeypatch.setenv("LWHUB_URL", OTHER)
    with from_env() as client:
        assert (client.url, client.token) == (OTHER, None)
    monkeypatch.setenv("LWHUB_TOKEN", "lwh_fromenv")  # the environment's token goes where the environment says
    with from_env() as client:
        assert client.token == "lwh_fromenv"
    with from_env(url=hub.url, token="lwh_keyword") as client:  # keywords win
        assert (client.url, client.token) == (hub.url, "lwh_keyword")


def test_lwhub_pull_uses_the_login_and_the_keys_pinned_by_the_command(home, hub, tmp_path, capsys, make_bundle):
    folder = make_bundle(tmp_path / "b", "alice/after-login", "1.0.0", hub.private, features=32, rank=4)
    hub.client(tmp_path / "publisher").push(folder)
    assert cli.main(["login", "--url", hub.url, "--token", hub.token]) == 0
    assert cli.main(["trust", "add", "alice", str(hub.public)]) == 0
    capsys.readouterr()
    with lwhub.pull("alice/after-login") as bundle:  # no LWHUB_URL: the hub `lwhub login` saved
        assert bundle.manifest.name == "alice/after-login"
    with Client(hub.url, cache_dir=tmp_path / "own-cache") as client:  # a cache of its own, the pins of the command
        assert client.trust.root == home / "trust"
        assert client.pull("alice/after-login").is_dir()
    shutil.rmtree(tmp_path / "own-cache")  # clearing a cache keeps pins and rollback protection
    assert Client(hub.url, cache_dir=tmp_path / "own-cache").trust.highest_seen("alice/after-login") == "1.0.0"


def test_a_trust_error_says_where_the_client_looked_and_how_to_pin_there(home, hub, tmp_path, make_bundle):
    folder = make_bundle(tmp_path / "b", "alice/pin-where", "1.0.0", hub.private, features=32, rank=4)
    hub.client(tmp_path / "publisher").push(folder)
    with pytest.raises(TrustError, match="lwhub trust add alice KEY.pub") as default:
        Client(hub.url, cache_dir=tmp_path / "c").pull("alice/pin-where")
    assert str(home / "trust") in str(default.value)
    elsewhere = tmp_path / "elsewhere"
    with pytest.raises(TrustError, match=r"client\.trust\.pin\('alice', 'KEY\.pub'\)") as given:
        Client(hub.url, cache_dir=tmp_path / "c", trust=elsewhere).pull("alice/pin-where")
    assert "lwhub trust add" not in str(given.value) and str(elsewhere) in str(given.value)


def test_a_client_without_a_url_points_at_from_env(home):
    with pytest.raises(UsageError, match=r"lwhub\.from_env\(\)"):
        Client()


def test_a_trust_store_left_in_the_cache_stays_in_use_with_a_warning(home, hub, tmp_path, make_bundle):
    """Clients given no trust= kept it in <cache_dir>/trust: its versions seen still refuse a rollback."""
    publisher = hub.client(tmp_path / "publisher")
    for version in ("1.0.0", "1.1.0"):
        publisher.push(make_bundle(tmp_path / version, "alice/kept", version, hub.private, features=32, rank=4))
    cache = tmp_path / "old-cache"
    with Client(hub.url, cache_dir=cache, trust=cache / "trust") as before:  # where the default used to be
        before.trust.pin("alice", hub.public)
        assert before.pull("alice/kept").is_dir() and before.trust.highest_seen("alice/kept") == "1.1.0"
    publisher.yank("alice/kept@1.1.0")  # "latest" now resolves to 1.0.0
    with pytest.warns(UserWarning) as said, Client(hub.url, cache_dir=cache) as client:
        assert client.trust.root == cache / "trust"
        with pytest.raises(RollbackError):
            client.pull("alice/kept")
    assert len(said) == 1  # once per client, not per pull
    message = str(said[0].message)
    assert str(cache / "trust") in message and str(home / "trust") in message
    assert f"trust={str(cache / 'trust')!r}" in message and "move it to" in message
    assert said[0].filename == __file__  # it points at the Client(...) line


def test_the_default_trust_store_is_used_without_a_word_when_the_cache_holds_none(home, hub, tmp_path, recwarn):
    (tmp_path / "empty-cache" / "trust").mkdir(parents=True)  # an empty store is no store
    assert Client(hub.url, cache_dir=tmp_path / "empty-cache").trust.root == home / "trust"
    (home / "trust" / "alice").mkdir(parents=True)
    (home / "trust" / "alice" / "kept@1.0.0.seen").touch()
    (tmp_path / "linked").mkdir()
    (tmp_path / "linked" / "trust").symlink_to(home / "trust")  # the cache's store is the home one
    assert Client(hub.url, cache_dir=tmp_path / "linked").trust.root == home / "trust"
    assert not [w for w in recwarn if w.category is UserWarning]


def test_the_command_and_from_env_keep_the_home_trust_store_whatever_the_cache_holds(home, hub, tmp_path, make_bundle, recwarn):
    hub.client(tmp_path / "publisher").push(make_bundle(tmp_path / "b", "alice/by-command", "1.0.0", hub.private, features=32, rank=4))
    TrustStore(tmp_path / "cache" / "trust").mark_seen("alice/other", "1.0.0")  # LWHUB_CACHE's, from a Client of old
    assert cli.main(["trust", "add", "alice", str(hub.public)]) == 0
    assert cli.main(["pull", "--url", hub.url, "alice/by-command"]) == 0  # the pin it added, not the cache's store
    with from_env() as client:
        assert client.trust.root == home / "trust"
    assert not [w for w in recwarn if w.category is UserWarning]


def test_a_damaged_saved_login_is_not_read_when_the_environment_gives_everything(home, monkeypatch):
    home.mkdir()
    (home / "config.json").write_text("{not json")
    monkeypatch.setenv("LWHUB_URL", OTHER)
    monkeypatch.setenv("LWHUB_TOKEN", "lwh_fromenv")
    with from_env() as client:  # LWHUB_CACHE too, from the fixture
        assert (client.url, client.token) == (OTHER, "lwh_fromenv")
    monkeypatch.delenv("LWHUB_TOKEN")  # now the saved login is needed: its damage is said
    with pytest.raises(UsageError, match="not a JSON settings file") as caught:
        from_env()
    assert caught.value.path == str(home / "config.json")


def test_a_signature_by_a_new_key_says_how_to_pin_in_the_clients_own_store(home, hub, tmp_path, make_bundle, other_keys):
    hub.client(tmp_path / "publisher").push(make_bundle(tmp_path / "b", "alice/rekeyed", "1.0.0", hub.private, features=32, rank=4))
    TrustStore(home / "trust").pin("alice", other_keys[1])  # a key pinned, but not the one that signed
    with pytest.raises(TrustError, match="signed by none of the keys pinned") as default:
        Client(hub.url, cache_dir=tmp_path / "c").pull("alice/rekeyed")
    assert "lwhub trust add alice KEY.pub" in str(default.value)
    own = TrustStore(tmp_path / "own-trust")
    own.pin("alice", other_keys[1])
    with pytest.raises(TrustError, match=r"signed by none.*client\.trust\.pin\('alice', 'KEY\.pub'\)") as given:
        Client(hub.url, cache_dir=tmp_path / "c", trust=own).pull("alice/rekeyed")
    assert "lwhub trust add" not in str(given.value) and str(own.root) in str(given.value)
