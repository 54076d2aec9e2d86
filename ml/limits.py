"""Limits that the library imposes and the service repeats to its users (imports nothing heavy)."""

from __future__ import annotations

# faiss GPU indexes answer at most k = 2048 (faiss/gpu/utils/DeviceDefs.cuh); the CPU indexes follow
# the same limit so that an index behaves the same wherever it runs.
MAX_K = 2048
