"""bench/peers.py refuses bad input in one line with exit code 2 and writes nothing (the bench itself needs
llm-compressor's own venv and is never run by the tests)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(tmp_path, *args, env=None):
    work, out = tmp_path / "work", tmp_path / "peers.md"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "peers.py"), *args, "--work", str(work),
                           "--out", str(out)], capture_output=True, text=True, env={**os.environ, **(env or {})})
    return proc, work, out


@pytest.mark.parametrize("args,match", [
    (["--peer-python", "/nonexistent/bin/python"], "cannot be run"),
    (["--peer-python", sys.executable], "cannot import llmcompressor"),  # our venv: llm-compressor is never in it
    (["--methods", "wanda,obs"], "unknown method 'obs'"),
    (["--threads", "0", "--peer-python", sys.executable], "positive whole numbers"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, match):
    proc, work, out = _run(tmp_path, *args)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and match in lines[0], lines
    assert not work.exists() and not out.exists()


def test_a_peer_venv_that_cannot_be_built_says_how_to_pass_one(tmp_path):
    """A real build attempt with pip told to use no index: it fails at once, the half-built venv is removed, and
    the message names --peer-python."""
    venv = tmp_path / "peer-venv"
    proc, work, out = _run(tmp_path, "--peer-venv", str(venv), env={"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": ""})
    lines = [ln for ln in proc.stderr.strip().splitlines() if not ln.startswith("building")]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and "could not build llm-compressor's venv" in lines[0] and "--peer-python" in lines[0]
    assert not venv.exists() and not work.exists() and not out.exists()
