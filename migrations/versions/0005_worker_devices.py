"""worker_devices: what each worker advertises (device, memory, measured throughput) for the
duration and memory estimates made before a run is queued

Revision ID: 0005_worker_devices
Revises: 0004_run_config_once
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005_worker_devices"
down_revision = "0004_run_config_once"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "worker_devices",
        sa.Column("name", sa.String(200), primary_key=True),
        sa.Column("queues", sa.String(200), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("device_name", sa.String(200), nullable=False),
        sa.Column("memory_bytes", sa.BigInteger(), nullable=False),
        sa.Column("calibration", sa.JSON(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("seen_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_worker_devices_seen_at", "worker_devices", ["seen_at"])
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("estimate", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("estimate")
    op.drop_index("ix_worker_devices_seen_at", table_name="worker_devices")
    op.drop_table("worker_devices")
