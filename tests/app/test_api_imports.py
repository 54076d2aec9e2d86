"""The API process loads neither the worker package nor torch: it enqueues tasks by name
(app/core/queue.py) and loads models only when a run is served."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_importing_the_api_loads_no_worker_code_and_no_torch():
    code = (
        "import sys, app.main; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'workers', 'torch', 'torchvision', 'faiss'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
