"""Evaluation speed: decode tokens/s and peak GPU memory of an evaluation run on a GPU, beside its bf16
baseline's.  Nullable: evaluations on the CPU, and those stored before this revision, have none.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23 19:00:00.000000
"""

from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = '0003'
down_revision: Union[str, Sequence[str], None] = '0002'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    with op.batch_alter_table('evaluations', schema=None) as batch_op:
        batch_op.add_column(sa.Column('speed', sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('evaluations', schema=None) as batch_op:
        batch_op.drop_column('speed')
