"""Quantizer: a profile's quantizer in a column of its own (JSON, `Quantizer`'s dump), and the estimator
alone in `estimator`.

Rows stored before this revision carry GPTQ as a suffix of the estimator (`"fisher/gptq"`): they become
estimator `"fisher"` with the GPTQ settings they were made with; every other row is RTN.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01 10:00:00.000000
"""

from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = '0004'
down_revision: Union[str, Sequence[str], None] = '0003'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

# Written out rather than imported: a revision must keep meaning what it meant when bitplan's defaults move.
RTN = {"method": "rtn"}
GPTQ = {"method": "gptq", "damp": 0.1, "block_size": 128, "act_order": True}
SUFFIX = "/gptq"

profiles = sa.table('profiles', sa.column('id', sa.String), sa.column('estimator', sa.String),
                    sa.column('quantizer', sa.JSON))


def upgrade() -> None:
    with op.batch_alter_table('profiles', schema=None) as batch_op:
        batch_op.add_column(sa.Column('quantizer', sa.JSON(), nullable=True))
    e = profiles.c.estimator
    op.execute(profiles.update().where(e.like(f"%{SUFFIX}"))
               .values(estimator=sa.func.substr(e, 1, sa.func.length(e) - len(SUFFIX)), quantizer=GPTQ))
    op.execute(profiles.update().where(profiles.c.quantizer.is_(None)).values(quantizer=RTN))
    with op.batch_alter_table('profiles', schema=None) as batch_op:
        batch_op.alter_column('quantizer', existing_type=sa.JSON(), nullable=False)


def downgrade() -> None:
    # GPTQ back into the estimator's suffix; settings other than the defaults above have no place there
    conn = op.get_bind()
    for id, estimator, quantizer in conn.execute(sa.select(profiles.c.id, profiles.c.estimator,
                                                           profiles.c.quantizer)).all():
        if (quantizer or {}).get("method") == "gptq":
            conn.execute(profiles.update().where(profiles.c.id == id).values(estimator=estimator + SUFFIX))
    with op.batch_alter_table('profiles', schema=None) as batch_op:
        batch_op.drop_column('quantizer')
