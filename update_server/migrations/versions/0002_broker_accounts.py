"""broker accounts: device revocation and the broker password hash

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from update_server.models import UTCDateTime

revision: str = '0002'
down_revision: str | None = '0001'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('devices') as batch:
        batch.add_column(sa.Column('revoked_at', UTCDateTime(), nullable=True))
        batch.add_column(sa.Column('mqtt_password_hash', sa.String(length=200), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('devices') as batch:
        batch.drop_column('mqtt_password_hash')
        batch.drop_column('revoked_at')
