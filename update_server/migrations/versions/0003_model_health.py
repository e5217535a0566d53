"""model health: per-version time buckets, per-device drift, gate history, device index by active version

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01 11:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from update_server.models import UTCDateTime

revision: str = '0003'
down_revision: str | None = '0002'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        'version_health',
        sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
        sa.Column('bundle_name', sa.String(length=128), nullable=False),
        sa.Column('bundle_version', sa.String(length=64), nullable=False),
        sa.Column('resolution', sa.Integer(), nullable=False),
        sa.Column('bucket_start', UTCDateTime(), nullable=False),
        sa.Column('windows', sa.BigInteger(), nullable=False),
        sa.Column('requests', sa.BigInteger(), nullable=False),
        sa.Column('errors', sa.BigInteger(), nullable=False),
        sa.Column('crashes', sa.BigInteger(), nullable=False),
        sa.Column('feedback_count', sa.BigInteger(), nullable=False),
        sa.Column('feedback_correct', sa.BigInteger(), nullable=False),
        sa.Column('lat_0', sa.BigInteger(), nullable=False),
        sa.Column('lat_1', sa.BigInteger(), nullable=False),
        sa.Column('lat_2', sa.BigInteger(), nullable=False),
        sa.Column('lat_3', sa.BigInteger(), nullable=False),
        sa.Column('lat_4', sa.BigInteger(), nullable=False),
        sa.Column('lat_5', sa.BigInteger(), nullable=False),
        sa.Column('lat_6', sa.BigInteger(), nullable=False),
        sa.Column('lat_7', sa.BigInteger(), nullable=False),
        sa.Column('lat_8', sa.BigInteger(), nullable=False),
        sa.Column('lat_9', sa.BigInteger(), nullable=False),
        sa.Column('lat_10', sa.BigInteger(), nullable=False),
        sa.Column('classes', sa.JSON(), nullable=False),
        sa.Column('input_samples', sa.BigInteger(), nullable=False),
        sa.Column('input_profile', sa.String(length=32), nullable=True),
        sa.Column('input_hist', sa.LargeBinary(), nullable=True),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('bundle_name', 'bundle_version', 'resolution', 'bucket_start', name='uq_version_health'),
    )
    op.create_index('ix_version_health_model', 'version_health', ['bundle_name', 'resolution', 'bucket_start'])
    op.create_table(
        'device_drift',
        sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
        sa.Column('device_id', sa.String(length=128), nullable=False),
        sa.Column('bundle_name', sa.String(length=128), nullable=False),
        sa.Column('bundle_version', sa.String(length=64), nullable=False),
        sa.Column('input_profile', sa.String(length=32), nullable=False),
        sa.Column('input_samples', sa.BigInteger(), nullable=False),
        sa.Column('input_hist', sa.LargeBinary(), nullable=False),
        sa.Column('first_at', UTCDateTime(), nullable=False),
        sa.Column('last_at', UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('device_id', 'bundle_name', 'bundle_version', name='uq_device_drift'),
    )
    op.create_table(
        'gate_history',
        sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
        sa.Column('rollout_id', sa.String(length=32), nullable=False),
        sa.Column('at', UTCDateTime(), nullable=False),
        sa.Column('phase', sa.Integer(), nullable=False),
        sa.Column('verdict', sa.String(length=16), nullable=False),
        sa.Column('gates', sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint('id'),
    )
    op.create_index('ix_gate_history_rollout', 'gate_history', ['rollout_id', 'at'])
    op.create_table(
        'drift_references',
        sa.Column('bundle_name', sa.String(length=128), nullable=False),
        sa.Column('bundle_version', sa.String(length=64), nullable=False),
        sa.Column('digest', sa.String(length=32), nullable=True),
        sa.Column('profile', sa.JSON(), nullable=True),
        sa.Column('loaded_at', UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint('bundle_name', 'bundle_version'),
    )
    op.create_index('ix_devices_active', 'devices', ['active_name', 'active_version'])


def downgrade() -> None:
    op.drop_index('ix_devices_active', table_name='devices')
    op.drop_table('drift_references')
    op.drop_index('ix_gate_history_rollout', table_name='gate_history')
    op.drop_table('gate_history')
    op.drop_table('device_drift')
    op.drop_index('ix_version_health_model', table_name='version_health')
    op.drop_table('version_health')
