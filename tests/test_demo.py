"""`make demo` (python -m cli.demo) as a user meets it: a rerun reuses the demo's own dataset and run
even after the user imported digits themselves, and SIGTERM stops everything with exit status 0 and
no traceback. Embedded mode in a private var/ folder; training sized to one epoch a stage."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--pretext-epochs", "1", "--clustering-epochs", "1", "--selflabel-epochs", "1", "--no-fashion"]


def _env(var: Path) -> dict[str, str]:
    return {
        **os.environ,
        "SCAN_VAR_DIR": str(var),
        "SCAN_DATABASE_URL": "",
        "SCAN_BROKER_URL": "",
        "PYTHONPATH": str(ROOT),
        "COLUMNS": "400",
        "PYTHONUNBUFFERED": "1",
    }


def _processes_of(var: Path) -> list[str]:
    """Processes whose environment points at this demo's var/ (the API and workers it started)."""
    marker = f"SCAN_VAR_DIR={var}".encode()
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if marker in environ.read_bytes().split(b"\0"):
                found.append(environ.parent.name)
        except OSError:
            continue
    return found


def _demo_once(var: Path) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "cli.demo", *TINY, "--exit"], cwd=ROOT, env=_env(var), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Traceback" not in done.stdout + done.stderr
    return re.search(r"run (\S+) SUCCEEDED", done.stdout).group(1)


def test_demo_reruns_reuse_its_own_run_and_sigterm_exits_cleanly(tmp_path):
    var = tmp_path / "var"
    first = _demo_once(var)

    # Second start, left running: it reuses the run; the user imports digits through its API; SIGTERM.
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli.demo", *TINY],
        cwd=ROOT,
        env=_env(var),
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        out = ""
        while "Ctrl-C stops it" not in out:
            line = proc.stdout.readline()
            assert line, f"demo exited early: {out[-3000:]}"
            out += line
        assert re.search(r"run (\S+) SUCCEEDED", out).group(1) == first
        base = re.search(r"API up at (http://\S+)", out).group(1)
        key = (var / "api-key.txt").read_text().strip()
        r = httpx.post(
            f"{base}/v1/datasets/import",
            json={"source": "digits"},
            headers={"Authorization": f"Bearer {key}"},
            timeout=600,
        )
        assert r.status_code == 201, r.text
        proc.send_signal(signal.SIGTERM)
        rest = proc.communicate(timeout=300)[0]
        assert proc.returncode == 0, rest[-3000:]
        assert "Traceback" not in out + rest
        assert _processes_of(var) == [], "the API or a worker outlived the demo"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    # Third start: the user's newer digits dataset does not make it train again.
    assert _demo_once(var) == first
