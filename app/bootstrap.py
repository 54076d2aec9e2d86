"""Start-up chores shared by the API, `make demo` and the CLI: migrations and the first API key."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import func, select

from app.core.settings import Settings


def alembic_config(settings: Settings):
    """Built from the installed `migrations` package, not from alembic.ini (a wheel has no repo top
    level to hold one): `scan db upgrade` works from `pip install scan-service` as from a checkout.
    alembic.ini stays for the `alembic` command line in a checkout and in the image."""
    from alembic.config import Config

    import migrations

    config = Config()
    config.set_main_option("script_location", str(Path(migrations.__file__).resolve().parent))
    config.attributes["settings"] = settings
    config.attributes["configure_logging"] = False
    return config


def migrate(settings: Settings) -> None:
    """`alembic upgrade head` against the Settings database (the only way the schema is made)."""
    from alembic import command

    settings.make_dirs()
    command.upgrade(alembic_config(settings), "head")


def ensure_first_key(settings: Settings) -> Path | None:
    """Embedded mode's first start: with no key in the database, create one for tenant "default" and
    write it to var/api-key.txt (mode 600). Returns the file when it was written."""
    from app.core.db import session_scope
    from app.services.auth import create_key
    from app.tables import ApiKey

    with session_scope() as session:
        if session.scalar(select(func.count()).select_from(ApiKey)):
            return None
        key = create_key(session, "default")
    path = settings.api_key_file
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(key + "\n")
    path.chmod(0o600)
    return path
