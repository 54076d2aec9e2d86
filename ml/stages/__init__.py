"""The four SCAN stages, in order. Each reads what the previous one wrote to the run directory.

This module is the one owner of the stage list: the pipeline, the service's run lifecycle, the UI
and the CLI import it (it imports nothing, so the API can read it without loading torch).
"""

from __future__ import annotations

STAGES: tuple[str, ...] = ("pretext", "mining", "clustering", "selflabel")


def stage_fraction(epoch: int | None, epochs: int | None, step: int | None, steps: int | None) -> float:
    """How much of a stage is done, 0..1, from its last progress report: ``epoch`` is the 1-based
    epoch in progress and ``step`` the 1-based step within it (``ml.stages.common.Progress``)."""
    if not epochs:
        return 0.0
    within = (step or 0) / steps if steps else 0.0
    return min(max((max((epoch or 1) - 1, 0) + within) / epochs, 0.0), 1.0)


def run_fraction(stage_fractions: dict[str, float]) -> float:
    """The whole run's fraction done: the four stages weigh the same."""
    return sum(min(max(stage_fractions.get(s, 0.0), 0.0), 1.0) for s in STAGES) / len(STAGES)
