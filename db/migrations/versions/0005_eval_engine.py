"""Evaluations by llama.cpp: which engine measured an evaluation (`bitplan`, or `llamacpp` through
`llama-perplexity`), and the mean KL divergence to the base model where it was measured.  Evaluations
stored before this revision were bitplan's own, without a KL divergence.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-05 10:00:00.000000
"""

from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = '0005'
down_revision: Union[str, Sequence[str], None] = '0004'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    with op.batch_alter_table('evaluations', schema=None) as batch_op:
        batch_op.add_column(sa.Column('engine', sa.String(length=32), nullable=False, server_default='bitplan'))
        batch_op.add_column(sa.Column('kl_divergence', sa.Double(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('evaluations', schema=None) as batch_op:
        batch_op.drop_column('kl_divergence')
        batch_op.drop_column('engine')
