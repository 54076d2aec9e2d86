"""runs: the config is stored once; num_clusters, preset and overrides are read from it

Revision ID: 0004_run_config_once
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004_run_config_once"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Lossless: every stored config already holds num_clusters and preset (RunConfig fields), and
    # overrides are derived from the config and its preset (RunConfig.overrides).
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("num_clusters")
        batch.drop_column("preset")
        batch.drop_column("overrides")


def downgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("num_clusters", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("preset", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("overrides", sa.JSON(), nullable=True))
    runs = sa.table(
        "runs",
        sa.column("id", sa.String),
        sa.column("config", sa.JSON),
        sa.column("num_clusters", sa.Integer),
        sa.column("preset", sa.String),
        sa.column("overrides", sa.JSON),
    )
    bind = op.get_bind()
    for run_id, config in bind.execute(sa.select(runs.c.id, runs.c.config)).all():
        # The request's own overrides were never kept apart from the config: {} restores the shape.
        bind.execute(
            runs.update()
            .where(runs.c.id == run_id)
            .values(num_clusters=int(config["num_clusters"]), preset=str(config["preset"]), overrides={})
        )
    with op.batch_alter_table("runs") as batch:
        batch.alter_column("num_clusters", existing_type=sa.Integer(), nullable=False)
        batch.alter_column("preset", existing_type=sa.String(length=64), nullable=False)
        batch.alter_column("overrides", existing_type=sa.JSON(), nullable=False)
