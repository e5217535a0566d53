"""telemetry end-to-end acknowledgement: per-device committed high-water mark, lost count, (device, seq) de-dup

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01 16:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0004'
down_revision: str | None = '0003'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        'telemetry_progress',
        sa.Column('device_id', sa.String(length=128), nullable=False),
        sa.Column('committed_seq', sa.BigInteger(), nullable=False),
        sa.Column('lost', sa.BigInteger(), nullable=False),
        sa.Column('resets', sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint('device_id'),
    )
    op.create_table(
        'telemetry_seqs',
        sa.Column('device_id', sa.String(length=128), nullable=False),
        sa.Column('seq', sa.BigInteger(), autoincrement=False, nullable=False),
        sa.PrimaryKeyConstraint('device_id', 'seq'),
    )


def downgrade() -> None:
    op.drop_table('telemetry_seqs')
    op.drop_table('telemetry_progress')
