"""Run counts and stage timings read from the database for `/metrics` (one grouped query each)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select

from app.core.db import new_session
from app.tables import Run, RunState, StageState, StageStatus


def run_statistics() -> dict[str, Any]:
    with new_session() as session:
        by_state = dict.fromkeys(RunState.ALL, 0)
        by_state.update({state: n for state, n in session.execute(select(Run.state, func.count()).group_by(Run.state))})
        durations = {
            stage: (int(n), float(total or 0.0))
            for stage, n, total in session.execute(
                select(StageStatus.stage, func.count(), func.sum(StageStatus.duration_s))
                .where(StageStatus.state == StageState.SUCCEEDED, StageStatus.duration_s.is_not(None))
                .group_by(StageStatus.stage)
            )
        }
    # Runs in QUEUED wait for a worker whatever the broker; the number is the same in both modes
    # and costs no broker round trip (Redis LLEN would miss tasks prefetched by a worker).
    return {"runs_by_state": by_state, "queue_depth": {"runs": by_state[RunState.QUEUED]}, "stage_durations": durations}
