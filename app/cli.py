"""`scan`: the ml pipeline's commands (train, evaluate, predict ...) plus the service's own.

    scan admin create-key --tenant acme     # prints a new API key for tenant acme
    scan db upgrade                         # alembic upgrade head against SCAN_DATABASE_URL
"""
from __future__ import annotations

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="SCAN: learn to classify images without labels (CLI and service admin).")
admin = typer.Typer(no_args_is_help=True, help="Service administration: API keys.")
db = typer.Typer(no_args_is_help=True, help="Database schema (Alembic).")
app.add_typer(admin, name="admin")
app.add_typer(db, name="db")


@admin.command("create-key")
def create_key(tenant: str = typer.Option(..., "--tenant", help="tenant name; created if new")) -> None:
    """Create an API key for TENANT and print it (only its hash is stored: keep it now)."""
    from app.core.db import session_scope
    from app.services.auth import create_key as make_key

    with session_scope() as session:
        key = make_key(session, tenant)
    typer.echo(key)


@db.command("upgrade")
def upgrade() -> None:
    """Apply all migrations (`alembic upgrade head`)."""
    from app.bootstrap import migrate
    from app.core.settings import get_settings

    migrate(get_settings())
    typer.echo("database is at the latest schema")


def _mount_ml_commands() -> None:
    # The researcher's CLI (ml/cli.py) lives in ml/, which knows nothing of the service; its commands
    # join ours so there is one `scan` entry point.
    try:
        from ml.cli import app as ml_app
    except ImportError:
        return
    app.registered_commands.extend(ml_app.registered_commands)
    app.registered_groups.extend(ml_app.registered_groups)


_mount_ml_commands()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
