"""Push refusals that happen before any upload, settings from the environment, shared caches."""

from __future__ import annotations

import threading

import httpx
import pytest

from lwformat.bundle.manifest import SIGNATURE, WEIGHTS
from lwformat.errors import IntegrityError as FormatIntegrityError
from lwhub.client import Client, from_env, parse_ref, pull
from lwhub.errors import HubUnavailableError, PushError, RefError, UsageError


def test_push_refuses_other_names_unsigned_and_changed_bundles(hub, tmp_path, make_bundle):
    folder = make_bundle(tmp_path / "b", "alice/pushy", "1.0.0", hub.private, features=64, rank=16)
    client = hub.client(tmp_path / "c")
    with pytest.raises(PushError, match="sign it again"):
        client.push(folder, name="alice/other")
    with pytest.raises(PushError, match="sign it again"):
        client.push(folder, version="2.0.0")
    unsigned = make_bundle(tmp_path / "u", "alice/pushy", "1.0.0", None, features=64, rank=16)
    with pytest.raises(PushError, match="not signed"):
        client.push(unsigned)
    data = bytearray((folder / WEIGHTS).read_bytes())
    data[-1] ^= 1
    (folder / WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(FormatIntegrityError):
        client.push(folder)
    assert [b.name for b in client.search("pushy")] == []  # nothing was published


def test_settings_come_from_the_environment_when_asked(hub, tmp_path, monkeypatch, make_bundle):
    folder = make_bundle(tmp_path / "b", "alice/from-env", "1.0.0", hub.private, features=64, rank=16)
    monkeypatch.setenv("LWHUB_URL", hub.url)
    monkeypatch.setenv("LWHUB_TOKEN", hub.token)
    monkeypatch.setenv("LWHUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("LWHUB_HOME", str(tmp_path / "home"))
    with from_env() as client:
        assert client.whoami().account == "alice"
        client.push(folder)
        client.trust.pin("alice", hub.public)
    assert list((tmp_path / "home" / "trust" / "alice").glob("*.pub"))  # pins live with the settings
    with pull("alice/from-env") as bundle:  # what `lwhub.pull` will be
        assert bundle.manifest.name == "alice/from-env" and bundle.path.parent.parent == tmp_path / "cache"
    with pytest.raises(HubUnavailableError):
        from_env(url="http://127.0.0.1:9").whoami()  # nothing listens on the discard port


def test_a_malformed_token_or_header_is_a_usage_error_that_never_quotes_it(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("LWHUB_HOME", str(tmp_path / "home"))
    for bad in (hub.token + "\r", hub.token + " ", "lwh_\u00e9", "Bearer " + hub.token):
        monkeypatch.setenv("LWHUB_TOKEN", bad)
        with pytest.raises(UsageError, match="malformed") as caught:
            from_env(url=hub.url, cache_dir=tmp_path / "c")
        assert hub.token not in str(caught.value)
    with Client(None, token="lwh_\u00e9", offline=True, cache_dir=tmp_path / "c"):  # never sent offline: no reason to refuse
        pass
    # The caller's own httpx client may carry a header HTTP does not allow: not an unreachable registry.
    with (httpx.Client(headers={"x-note": "secret\r"}) as http, Client(hub.url, http=http, cache_dir=tmp_path / "c") as client,
          pytest.raises(UsageError, match="could not be sent") as caught):  # fmt: skip
        client.info("alice/none")
    assert "secret" not in str(caught.value)


def test_pulls_sharing_one_cache_need_no_lock(hub, tmp_path, make_bundle):
    folder = make_bundle(tmp_path / "b", "alice/shared", "1.0.0", hub.private, features=512, rank=256)
    hub.client(tmp_path / "pub").push(folder)
    paths, barrier = [], threading.Barrier(4)

    def one() -> None:
        client = hub.client(tmp_path / "cache")
        barrier.wait()
        paths.append(client.pull("alice/shared"))

    threads = [threading.Thread(target=one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(paths) == 4 and len(set(paths)) == 1
    assert (paths[0] / WEIGHTS).read_bytes() == (folder / WEIGHTS).read_bytes()
    assert (paths[0] / SIGNATURE).read_bytes() == (folder / SIGNATURE).read_bytes()
    assert list((tmp_path / "cache" / "tmp").iterdir()) == [] and list((tmp_path / "cache" / "partial").iterdir()) == []


def test_references_name_a_version_a_tag_or_latest():
    assert parse_ref("alice/x") == parse_ref("alice/x@") == ("alice", "x", "latest")
    assert parse_ref("alice/x@1.2.3-rc.1") == ("alice", "x", "1.2.3-rc.1")
    assert parse_ref("alice/x@beta") == ("alice", "x", "beta")


@pytest.mark.parametrize("ref", ["alice", "alice/x/y", "Alice/x", "alice/x@../../v1/tokens", "alice/x@1.0", "/x", "alice/x@01.0.0",
                                 pytest.param("alice/x@" + "1" * 5000 + ".0.0", id="alice/x@<5000 digits>.0.0")])  # fmt: skip
def test_malformed_references_are_refused_before_any_request(ref):
    with pytest.raises(RefError):
        parse_ref(ref)
