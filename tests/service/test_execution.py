"""The worker-side bookkeeping on the real test database: leases, bounded redeliveries, recovery.

These drive app.services.execution directly (no worker process) so that the edge cases a killed
worker produces can be staged exactly: a live lease, a stale one, one delivery too many.
"""
from __future__ import annotations

from datetime import timedelta

import pytest

from app.models import Dataset, Run, RunEvent, StageStatus, Tenant, utcnow
from app.services import execution
from ml.stages import STAGES
from tests.service.conftest import db_session


@pytest.fixture
def run_id(stack) -> str:
    with db_session() as session:
        tenant = Tenant(name=f"exec-{utcnow().timestamp()}")
        session.add(tenant)
        session.flush()
        dataset = Dataset(tenant_id=tenant.id, name="d", source="digits", state="READY")
        session.add(dataset)
        session.flush()
        run = Run(tenant_id=tenant.id, dataset_id=dataset.id, num_clusters=10, preset="small", overrides={},
                  config={}, stage="pretext")
        session.add(run)
        session.flush()
        session.add_all([StageStatus(run_id=run.id, stage=s) for s in STAGES])
        session.commit()
        return run.id


def _age_heartbeat(run_id: str, seconds: float) -> None:
    with db_session() as session:
        run = session.get(Run, run_id)
        run.heartbeat_at = utcnow() - timedelta(seconds=seconds)
        session.commit()


def test_a_live_lease_turns_a_duplicate_away(stack, run_id):
    settings = stack.settings
    with db_session() as session:
        first = execution.claim(session, settings, run_id, "pretext")
        assert isinstance(first, execution.Claim) and first.attempt == 1
        assert execution.claim(session, settings, run_id, "pretext") is None  # still heart-beating
        assert execution.claim(session, settings, run_id, "mining") is None   # not the run's stage
        assert execution.finish_stage(session, run_id, "pretext", {"loss": 1.0}) == "mining"
        assert execution.claim(session, settings, run_id, "pretext") is None  # done and moved on
        assert session.get(Run, run_id).state == "MINING"


def test_redeliveries_are_bounded_with_a_clear_message(stack, run_id):
    settings = stack.settings
    limit = settings.max_stage_attempts
    with db_session() as session:
        for attempt in range(1, limit + 1):
            claim = execution.claim(session, settings, run_id, "pretext")
            assert isinstance(claim, execution.Claim) and claim.attempt == attempt
            _age_heartbeat(run_id, settings.stale_after_s + 5)  # the worker "died"
            session.expire_all()
        assert execution.claim(session, settings, run_id, "pretext") is None
        session.expire_all()
        run = session.get(Run, run_id)
        assert run.state == "FAILED" and run.redeliveries == limit
        assert f"started {limit + 1} times" in run.error and "max_stage_attempts" in run.error
        assert session.get(StageStatus, (run_id, "pretext")).state == "FAILED"


def test_stale_runs_are_found_once(stack, run_id):
    settings = stack.settings
    with db_session() as session:
        assert isinstance(execution.claim(session, settings, run_id, "pretext"), execution.Claim)
        assert run_id not in dict(execution.stale_runs(session, settings))
        _age_heartbeat(run_id, settings.stale_after_s + 5)
        assert dict(execution.stale_runs(session, settings)).get(run_id) == "pretext"
        assert run_id not in dict(execution.stale_runs(session, settings))  # bumped: not re-enqueued twice
        session.expire_all()
        assert session.get(Run, run_id).lease_token is None
        kinds = [e.kind for e in session.query(RunEvent).filter_by(run_id=run_id)]
        assert "recovered" in kinds
        claim = execution.claim(session, settings, run_id, "pretext")
        assert isinstance(claim, execution.Claim) and claim.attempt == 2


def test_cancel_flag_ends_a_run_at_its_next_claim(stack, run_id):
    with db_session() as session:
        session.get(Run, run_id).cancel_requested = True
        session.commit()
        assert execution.claim(session, stack.settings, run_id, "pretext") is None
        session.expire_all()
        assert session.get(Run, run_id).state == "CANCELED"
