"""The worker-side bookkeeping on a real database: leases, bounded redeliveries, recovery.

These drive app.services.execution directly (no worker process) so that the edge cases a killed
worker produces can be staged exactly: a live lease, a stale one, one delivery too many. They do so
on a database of their own, migrated from empty like the stack's: the stack's live workers poll
theirs for stale leases and owed wake-ups every second, and would otherwise claim, recover or
dispatch these hand-staged runs between two steps of a test (CI saw each of the three).
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import make_url
from sqlalchemy.orm import Session, sessionmaker

from app.core.db import make_engine
from app.services import execution
from app.tables import Dataset, Run, RunEvent, StageStatus, Tenant, utcnow
from ml.config import RunConfig
from ml.stages import STAGES

_factory: sessionmaker[Session] | None = None


@pytest.fixture(scope="module")
def settings(stack, tmp_path_factory):
    """The stack's settings on a private database: a sibling PostgreSQL database in services mode, a
    SQLite file in embedded mode."""
    global _factory
    import psycopg

    from app.bootstrap import migrate

    base = stack.settings
    admin = None
    if base.db_url.startswith("postgresql"):
        url = make_url(base.db_url)
        name = f"{url.database}_execution"
        admin = url.set(drivername="postgresql").render_as_string(hide_password=False)
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{name}"')
        private_url = url.set(database=name).render_as_string(hide_password=False)
    else:
        private_url = f"sqlite:///{tmp_path_factory.mktemp('execution-db') / 'scan.db'}"
    private = base.model_copy(update={"database_url": private_url})
    migrate(private)
    engine = make_engine(private)
    _factory = sessionmaker(engine, expire_on_commit=False)
    yield private
    _factory = None
    engine.dispose()
    if admin:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def db_session() -> Session:
    assert _factory is not None, "use the settings fixture first"
    return _factory()  # a Session is its own context manager


@pytest.fixture
def run_id(settings) -> str:
    with db_session() as session:
        tenant = Tenant(name=f"exec-{utcnow().timestamp()}")
        session.add(tenant)
        session.flush()
        dataset = Dataset(tenant_id=tenant.id, name="d", source="digits", state="READY")
        session.add(dataset)
        session.flush()
        run = Run(
            tenant_id=tenant.id,
            dataset_id=dataset.id,
            config=RunConfig.from_preset("small", 10).model_dump(mode="json"),
            stage="pretext",
        )
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


def test_a_live_lease_turns_a_duplicate_away(settings, run_id):
    with db_session() as session:
        first = execution.claim(session, settings, run_id, "pretext")
        assert isinstance(first, execution.Claim) and first.attempt == 1
        assert execution.claim(session, settings, run_id, "pretext") is None  # still heart-beating
        assert execution.claim(session, settings, run_id, "mining") is None  # not the run's stage
        assert execution.finish_stage(session, run_id, "pretext", {"loss": 1.0}) == "mining"
        assert execution.claim(session, settings, run_id, "pretext") is None  # done and moved on
        assert session.get(Run, run_id).state == "MINING"


def test_redeliveries_are_bounded_with_a_clear_message(settings, run_id):
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


def test_stale_runs_are_found_once(settings, run_id):
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


def test_a_claim_that_takes_over_a_dead_lease_says_the_run_was_recovered(settings, run_id):
    # A redelivered message can reach a fresh worker before the dispatcher's sweep sees the dead
    # lease; the run's events must tell the same story either way.
    with db_session() as session:
        assert isinstance(execution.claim(session, settings, run_id, "pretext"), execution.Claim)
        kinds = [e.kind for e in session.query(RunEvent).filter_by(run_id=run_id)]
        assert "recovered" not in kinds  # a first claim of a free lease recovers nothing
        _age_heartbeat(run_id, settings.stale_after_s + 5)
        session.expire_all()
        claim = execution.claim(session, settings, run_id, "pretext")
        assert isinstance(claim, execution.Claim) and claim.attempt == 2
        events = [(e.kind, e.stage) for e in session.query(RunEvent).filter_by(run_id=run_id).order_by(RunEvent.id)]
        assert events.count(("recovered", "pretext")) == 1
        assert events.index(("recovered", "pretext")) < len(events) - 1  # before the attempt it recovers


def test_cancel_flag_ends_a_run_at_its_next_claim(settings, run_id):
    with db_session() as session:
        session.get(Run, run_id).cancel_requested = True
        session.commit()
        assert execution.claim(session, settings, run_id, "pretext") is None
        session.expire_all()
        assert session.get(Run, run_id).state == "CANCELED"


def _age(run_id: str, **seconds: float) -> None:
    with db_session() as session:
        run = session.get(Run, run_id)
        for column, s in seconds.items():
            setattr(run, column, utcnow() - timedelta(seconds=s))
        session.commit()


def test_a_run_waiting_between_stages_is_not_taken_for_dead(settings, run_id):
    with db_session() as session:
        claim = execution.claim(session, settings, run_id, "pretext")
        execution.finish_stage(session, run_id, "pretext", {}, claim.token)
    _age(run_id, heartbeat_at=settings.stale_after_s + 5)  # waits behind another run's long stage
    with db_session() as session:
        assert run_id not in dict(execution.stale_runs(session, settings))
        assert not [e for e in session.query(RunEvent).filter_by(run_id=run_id) if e.kind == "recovered"]


def test_the_dispatcher_resends_only_what_is_owed(settings, run_id):
    _age(run_id, created_at=60)
    with db_session() as session:
        # Never sent (the API died between commit and send): owed whatever the queue holds.
        assert dict(execution.due_for_dispatch(session, settings, queue_empty=False)).get(run_id) == "pretext"
        assert run_id not in dict(execution.due_for_dispatch(session, settings, queue_empty=True))  # just sent
    _age(run_id, dispatched_at=settings.dispatch_after_s + 5)
    with db_session() as session:
        # Sent long ago: a queue that still holds messages is trusted to hold this one too.
        assert run_id not in dict(execution.due_for_dispatch(session, settings, queue_empty=False))
        assert dict(execution.due_for_dispatch(session, settings, queue_empty=True)).get(run_id) == "pretext"
        assert [e.kind for e in session.query(RunEvent).filter_by(run_id=run_id)].count("redispatched") == 1
        claim = execution.claim(session, settings, run_id, "pretext")
    _age(run_id, dispatched_at=settings.dispatch_after_s + 5)
    with db_session() as session:
        assert run_id not in dict(execution.due_for_dispatch(session, settings, queue_empty=True))  # leased
        assert isinstance(claim, execution.Claim)


def test_an_infrastructure_interruption_does_not_spend_an_attempt(settings, run_id):
    with db_session() as session:
        first = execution.claim(session, settings, run_id, "pretext")
        execution.release(session, run_id, "pretext", first.token, "the database was unreachable too long")
        again = execution.claim(session, settings, run_id, "pretext")
        assert again.attempt == first.attempt == 1
        with pytest.raises(execution.LeaseLost):
            execution.finish_stage(session, run_id, "pretext", {}, first.token)  # the old task's lease is gone
        assert execution.finish_stage(session, run_id, "pretext", {}, again.token) == "mining"
        assert session.get(Run, run_id).dispatched_at is None  # a wake-up for mining is owed


def test_a_missing_input_rewinds_to_the_stage_that_writes_it(settings, run_id):
    with db_session() as session:
        for stage in ("pretext", "mining"):
            claim = execution.claim(session, settings, run_id, stage)
            execution.finish_stage(session, run_id, stage, {}, claim.token)
        claim = execution.claim(session, settings, run_id, "clustering")
        execution.rewind(session, run_id, "clustering", claim.token, "mining", "neighbors.npy")
        session.expire_all()
        run = session.get(Run, run_id)
        assert (run.stage, run.state, run.lease_token) == ("mining", "MINING", None)
        assert session.get(StageStatus, (run_id, "mining")).state == "PENDING"
        assert session.get(StageStatus, (run_id, "pretext")).state == "SUCCEEDED"
        event = session.query(RunEvent).filter_by(run_id=run_id, kind="rewound").one()
        assert "neighbors.npy" in event.message
        assert isinstance(execution.claim(session, settings, run_id, "mining"), execution.Claim)


def test_waiting_runs_oldest_first(settings, run_id):
    with db_session() as session:
        older = session.get(Run, run_id)
        newer = Run(
            tenant_id=older.tenant_id,
            dataset_id=older.dataset_id,
            config=RunConfig.from_preset("small", 10).model_dump(mode="json"),
            stage="pretext",
        )
        session.add(newer)
        session.commit()
        waiting = [r for r, _ in execution.waiting_runs(session, settings, limit=1000)]
        assert waiting.index(run_id) < waiting.index(newer.id)
