"""The schema exists only through Alembic: from empty to head, and no autogenerate diff."""

from __future__ import annotations

import uuid

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, inspect, text

from app.bootstrap import alembic_config
from app.tables import Base


def _check(connection, settings) -> None:
    config = alembic_config(settings)
    config.attributes["connection"] = connection
    assert "runs" not in inspect(connection).get_table_names()
    command.upgrade(config, "head")
    context = MigrationContext.configure(connection, opts={"compare_type": True})
    assert context.get_current_revision() == ScriptDirectory.from_config(config).get_current_head()
    assert compare_metadata(context, Base.metadata) == []
    command.downgrade(config, "base")
    assert set(inspect(connection).get_table_names()) <= {"alembic_version"}
    command.upgrade(config, "head")


def test_upgrade_from_empty_matches_models(stack, tmp_path):
    settings = stack.settings
    if stack.mode == "services":
        # A private schema of the test database, so the session's tables are untouched.
        schema = f"mig_{uuid.uuid4().hex[:8]}"
        engine = create_engine(settings.db_url)
        with engine.connect() as conn:
            conn.execute(text(f"CREATE SCHEMA {schema}"))
            conn.commit()
        scoped = create_engine(settings.db_url, connect_args={"options": f"-csearch_path={schema}"})
        try:
            with scoped.connect() as conn:
                _check(conn, settings)
                conn.commit()
        finally:
            scoped.dispose()
            with engine.connect() as conn:
                conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
                conn.commit()
            engine.dispose()
    else:
        engine = create_engine(f"sqlite:///{tmp_path / 'empty.db'}")
        with engine.connect() as conn:
            _check(conn, settings)
        engine.dispose()


def test_session_database_is_at_head_without_diff(stack):
    from app.core.db import get_engine

    with get_engine().connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        assert context.get_current_revision() is not None
        assert compare_metadata(context, Base.metadata) == []
