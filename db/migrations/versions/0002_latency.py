"""Latency: a profile's optional latency table (seconds per module, option and batch) and a plan's
predicted latency.

Every new column is nullable: profiles and plans stored before this revision have no latency.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30 10:00:00.000000
"""

from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = '0002'
down_revision: Union[str, Sequence[str], None] = '0001'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    with op.batch_alter_table('profiles', schema=None) as batch_op:
        batch_op.add_column(sa.Column('latency', sa.LargeBinary(), nullable=True))
        batch_op.add_column(sa.Column('latency_batches', sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column('latency_source', sa.String(length=256), nullable=True))
    with op.batch_alter_table('plans', schema=None) as batch_op:
        batch_op.add_column(sa.Column('predicted_latency', sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column('latency_source', sa.String(length=256), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('plans', schema=None) as batch_op:
        batch_op.drop_column('latency_source')
        batch_op.drop_column('predicted_latency')
    with op.batch_alter_table('profiles', schema=None) as batch_op:
        batch_op.drop_column('latency_source')
        batch_op.drop_column('latency_batches')
        batch_op.drop_column('latency')
