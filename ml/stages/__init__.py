"""The four SCAN stages, in order. Each reads what the previous one wrote to the run directory.

This module is the one owner of the stage list: the pipeline, the service's run lifecycle, the UI
and the CLI import it (it imports nothing, so the API can read it without loading torch).
"""

from __future__ import annotations

STAGES: tuple[str, ...] = ("pretext", "mining", "clustering", "selflabel")
