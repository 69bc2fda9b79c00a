"""Jobs run by workers: who holds a job and when it last said so (`worker`, `heartbeat_at`), when it
started and finished, how many times it was claimed, whether a cancel was asked for, an ETA and what
it made beyond an id (`result`); states
`succeeded` and `cancelled` (`done` rows become `succeeded`); an index for pages, newest first.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-08 10:00:00.000000
"""

from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = '0006'
down_revision: Union[str, Sequence[str], None] = '0005'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

# Written out rather than imported: a revision must keep meaning what it meant.
OLD_STATES = "state IN ('queued', 'running', 'done', 'failed')"
NEW_STATES = "state IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')"

jobs = sa.table('jobs', sa.column('state', sa.String))


def upgrade() -> None:
    # the rows change state between dropping the old rule and adding the new one: each forbids the other's
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_constraint(op.f('ck_jobs_state'), type_='check')
        batch_op.add_column(sa.Column('worker', sa.String(length=256), nullable=True))
        batch_op.add_column(sa.Column('heartbeat_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('started_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('attempts', sa.BigInteger(), nullable=False, server_default='0'))
        batch_op.add_column(sa.Column('cancel_requested', sa.Boolean(), nullable=False, server_default='0'))
        batch_op.add_column(sa.Column('eta_seconds', sa.Double(), nullable=True))
        batch_op.add_column(sa.Column('result', sa.JSON(), nullable=True))
        batch_op.create_index('ix_jobs_created_at_id', ['created_at', 'id'])
    op.execute(jobs.update().where(jobs.c.state == 'done').values(state='succeeded'))
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.create_check_constraint('state', NEW_STATES)


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_constraint(op.f('ck_jobs_state'), type_='check')
    op.execute(jobs.update().where(jobs.c.state == 'succeeded').values(state='done'))
    op.execute(jobs.update().where(jobs.c.state == 'cancelled').values(state='failed'))
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_index('ix_jobs_created_at_id')
        for column in ('result', 'eta_seconds', 'cancel_requested', 'attempts', 'finished_at', 'started_at', 'heartbeat_at',
                       'worker'):
            batch_op.drop_column(column)
        batch_op.create_check_constraint('state', OLD_STATES)
