"""The README's examples run end to end (the demo starts a real hub on loopback)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("script", "expected"),
    [
        ("demo.py", "the effect moves monotonically with the weight"),
        ("train_light_world.py", "base world unchanged"),
    ],
)
def test_example_runs(script, expected):
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script)], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert expected in done.stdout
