"""`scan`: one command for the researcher's pipeline (ml/cli.py) and the service's administration.

    scan train digits --clusters 10 --out runs/digits     # ml/: no server needed
    scan evaluate runs/digits
    scan predict runs/digits a.png
    scan admin create-key --tenant acme                   # prints a new API key for tenant acme
    scan admin revoke-key scan_ab12cd34ef56_...           # or just its prefix ab12cd34ef56
    scan db upgrade                                       # alembic upgrade head (SCAN_DATABASE_URL)

The service commands import the app lazily, so `scan train` starts without loading SQLAlchemy.
"""

from __future__ import annotations

import typer

from ml.cli import evaluate, predict, train

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="SCAN: learn to classify images without labels (CLI and service admin).",
)
app.command()(train)
app.command()(evaluate)
app.command()(predict)

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


@admin.command("revoke-key")
def revoke_key(
    key: str = typer.Argument(..., help="the key, or its prefix (the part after `scan_`)"),
) -> None:
    """Revoke an API key: refused at once by every API process sharing this var directory, and by
    other hosts within SCAN_AUTH_CACHE_S."""
    from app.core.db import session_scope
    from app.services.auth import forget_verified_keys, key_prefix, revoke

    prefix = key_prefix(key) or key
    with session_scope() as session:
        revoke(session, prefix)
    forget_verified_keys()
    typer.echo(f"revoked key {prefix}")


@db.command("upgrade")
def upgrade() -> None:
    """Apply all migrations (`alembic upgrade head`)."""
    from app.bootstrap import migrate
    from app.core.settings import get_settings

    migrate(get_settings())
    typer.echo("database is at the latest schema")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
