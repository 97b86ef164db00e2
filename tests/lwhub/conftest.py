"""Hub fixtures: real signed bundles, real keys, and a real registry on a loopback port."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from lwformat import Block, LightConfig, World
from lwformat.bundle.keys import generate_keypair, load_private_key
from lwformat.bundle.signing import sign_bundle
from lwformat.bundle.write import write_bundle
from lwhub.client import Client
from lwhub.server import create_account, serve

CHUNK = 1 << 16  # the smallest chunk the spec allows: many chunks from a small file
_seeds = itertools.count(1)


def build_bundle(dest: Path, name: str, version: str, key: Path | None, *, features: int = 256, rank: int = 256,
                seed: int | None = None, description: str = "", tags: tuple[str, ...] = ()) -> Path:  # fmt: skip
    """A real bundle of one LoRA slot (weights ~ 2*features*rank*4 bytes), signed with `key` unless None."""
    torch.manual_seed(next(_seeds) if seed is None else seed)
    world = World.from_blocks({"author/narrate/text/llm": Block(nn.Sequential(nn.Linear(features, features)), "llm")})
    world.customize(LightConfig(rank=rank))
    for p in world.parameters():
        if p.requires_grad:
            nn.init.normal_(p)  # LoRA's B starts at zero: fill it so every chunk differs
    write_bundle(world, dest, name=name, version=version, chunk_size=CHUNK, description=description, tags=tags)
    if key is not None:
        sign_bundle(dest, load_private_key(key))
    return dest


@dataclass
class Hub:
    url: str
    data: Path
    token: str  # alice's: scope "alice"
    private: Path  # alice's publisher key
    public: Path
    server: object

    def client(self, cache: Path, *, token: str | None = "default", pin: bool = True, **kw) -> Client:
        """A client whose trust store is `cache`/trust unless given `trust=`: each test's own."""
        kw.setdefault("trust", cache / "trust")
        client = Client(self.url, token=self.token if token == "default" else token, cache_dir=cache, **kw)
        if pin:
            client.trust.pin("alice", self.public)
        return client


@pytest.fixture(scope="session", autouse=True)
def settings_home(tmp_path_factory):
    """No test reads or writes the settings of the person running them (~/.config/lwhub): the
    saved login and the trust store every client defaults to live here unless a test sets its own."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LWHUB_HOME", str(tmp_path_factory.mktemp("lwhub-home")))
        yield


@pytest.fixture(scope="session")
def make_bundle():
    """`build_bundle(dest, name, version, key, ...)`: a real signed bundle directory."""
    return build_bundle


@pytest.fixture(scope="session")
def keys(tmp_path_factory) -> tuple[Path, Path]:
    return generate_keypair(tmp_path_factory.mktemp("keys"), name="alice")


@pytest.fixture(scope="session")
def other_keys(tmp_path_factory) -> tuple[Path, Path]:
    return generate_keypair(tmp_path_factory.mktemp("other-keys"), name="mallory")


def start_hub(data: Path, keys: tuple[Path, Path], **serve_kw) -> Hub:
    token = create_account(data, "alice")
    server = serve(data, **serve_kw)
    hub = Hub(server.url, data, token, keys[0], keys[1], server)
    with Client(hub.url, token=token, cache_dir=data.parent / "setup-cache") as c:
        c.register_key("alice", keys[1])
    return hub


@pytest.fixture(scope="session")
def hub(tmp_path_factory, keys):
    """One registry for the session (starting one takes a second or two): tests publish under their own names."""
    hub = start_hub(tmp_path_factory.mktemp("hub") / "data", keys)
    yield hub
    hub.server.stop()
