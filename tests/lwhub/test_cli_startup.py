"""`lwhub` starts without torch: only the verbs that make tensors (`check`, `blend`) import it.

Each check runs in a fresh interpreter, since this one imported torch long ago.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lwhub.trust import TrustStore

ROOT = Path(__file__).resolve().parents[2]
# Runs one verb, then says on stderr whether torch was imported along the way.
RUN_VERB = """
import sys
from lwhub.cli import main
code = main(sys.argv[1:])
print("torch imported:", "torch" in sys.modules, file=sys.stderr)
sys.exit(code)
"""


def python(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def run_verb(*argv: object, env: dict[str, str] | None = None) -> dict:
    """Run ``lwhub ARGV --json`` in a fresh interpreter; its JSON answer, once torch is known not imported."""
    done = python("-c", RUN_VERB, *map(str, argv), "--json", env=env)
    assert done.returncode == 0, done.stderr
    assert "torch imported: False" in done.stderr, done.stderr
    return json.loads(done.stdout)


def test_importing_the_cli_and_the_client_does_not_import_torch():
    done = python("-c", "import sys, lwhub.cli, lwhub.client, lwformat.bundle; print('torch' in sys.modules)")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


@pytest.fixture(scope="module")
def signed(make_bundle, keys, tmp_path_factory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("startup") / "bundle", "alice/startup", "1.0.0", keys[0], features=16, rank=2)


def test_verify_and_inspect_run_without_torch(signed, keys):
    verified = run_verb("verify", signed, "--key", keys[1])
    assert verified["ok"] and verified["signature_checked"] and verified["name"] == "alice/startup"
    inspected = run_verb("inspect", signed)
    assert inspected["signed"] and inspected["manifest"]["name"] == "alice/startup"


def test_pull_runs_without_torch(hub, signed, tmp_path):
    hub.client(tmp_path / "publisher").push(signed)
    TrustStore(tmp_path / "home" / "trust").pin("alice", hub.public)
    env = os.environ | {"LWHUB_URL": hub.url, "LWHUB_HOME": str(tmp_path / "home"), "LWHUB_CACHE": str(tmp_path / "cache")}
    env.pop("LWHUB_TOKEN", None)
    pulled = run_verb("pull", "alice/startup@1.0.0", "--quiet", env=env)
    assert Path(pulled["path"]).is_dir() and pulled["name"] == "alice/startup"
