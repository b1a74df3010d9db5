"""What the benches share: each measurement runs in a fresh Python process (clean peak RSS; an out-of-memory
kill ends only that measurement), which prints its result as JSON on its last line of stdout."""
from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def trim_memory() -> None:
    """Collect garbage and hand freed heap back to the OS, so the next peak starts from what is live."""
    import ctypes

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def run_in_child(script: str, spec: dict, timeout: float | None = None) -> dict:
    """Run ``script --child SPEC_JSON`` offline in a fresh process; its last stdout line, parsed.

    On failure the result is ``{"error": why, "stderr": tail}`` (timeout, out-of-memory kill, exit status)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    t0 = time.time()
    try:
        proc = subprocess.run([sys.executable, script, "--child", json.dumps(spec)], capture_output=True,
                              text=True, env=env, cwd=ROOT, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s", "stderr": ""}
    if proc.returncode != 0:
        why = "killed (out of memory?)" if proc.returncode in (-9, 137) else f"exit {proc.returncode}"
        return {"error": why, "stderr": proc.stderr[-3000:]}
    lines = proc.stdout.strip().splitlines()
    if not lines:
        return {"error": "the child printed no result", "stderr": proc.stderr[-3000:]}
    result = json.loads(lines[-1])
    result["process_s"] = time.time() - t0
    return result
