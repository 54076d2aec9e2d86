"""Print the pip requirements of one image variant, from pyproject.toml (one list to maintain).

    python docker/requirements.py cpu   # the project's dependencies (faiss-cpu)
    python docker/requirements.py gpu   # the same with faiss-gpu-cu12 *instead of* faiss-cpu

Both wheels install the same `faiss` module, so installing the GPU one on top of the CPU one leaves
whichever was unpacked last; each image gets exactly one.
"""

from __future__ import annotations

import sys
from pathlib import Path

import tomllib

project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
variant = sys.argv[1] if len(sys.argv) > 1 else "cpu"
if variant not in ("cpu", "gpu"):
    sys.exit(f"variant must be cpu or gpu, not {variant!r}")
deps = list(project["dependencies"])
if variant == "gpu":
    deps = [d for d in deps if not d.startswith("faiss-cpu")] + project["optional-dependencies"]["gpu"]
print("\n".join(deps))
