"""The planted-bug example end to end: health passes the good run and fails the bad one."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_planted_bug_example_is_caught(tmp_path):
    """examples/planted_bug.py: exit 0 on the good run, non-zero with divergence and schema on the bad run."""
    p = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "planted_bug.py"), "--store",
                        str(tmp_path / "s")], capture_output=True, text=True, timeout=240, cwd=str(tmp_path))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    out = p.stdout
    assert "good run: health exit 0; bad run: health exit 1" in out
    bad = out[out.index("exit code 0"):]
    assert "FAIL   divergence" in bad and "FAIL   schema" in bad and "missing categories" in bad
    assert "items worth a look" in bad
