"""Initial schema: models, calibration sets, profiles, plans, evaluations, jobs.

Revision ID: 0001
Revises:
Create Date: 2026-11-23 11:13:31.220369
"""

from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = '0001'
down_revision: Union[str, Sequence[str], None] = None
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    # the first schema, table by table, as alembic writes it: read as a list, not split into functions
    op.create_table('calibration_sets',
    sa.Column('id', sa.String(length=128), nullable=False),
    sa.Column('name', sa.String(length=512), nullable=False),
    sa.Column('n_tokens', sa.BigInteger(), nullable=False),
    sa.Column('description', sa.Text(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_calibration_sets'))
    )
    op.create_table('jobs',
    sa.Column('id', sa.String(length=128), nullable=False),
    sa.Column('kind', sa.String(length=64), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('progress', sa.Double(), nullable=False),
    sa.Column('message', sa.Text(), nullable=False),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('params', sa.JSON(), nullable=False),
    sa.Column('result_id', sa.String(length=128), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.CheckConstraint("state IN ('queued', 'running', 'done', 'failed')", name=op.f('ck_jobs_state')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_jobs'))
    )
    op.create_index(op.f('ix_jobs_state'), 'jobs', ['state'])
    op.create_table('models',
    sa.Column('id', sa.String(length=128), nullable=False),
    sa.Column('name', sa.String(length=512), nullable=False),
    sa.Column('source', sa.Text(), nullable=False),
    sa.Column('n_params', sa.BigInteger(), nullable=False),
    sa.Column('config', sa.JSON(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_models'))
    )
    op.create_table('profiles',
    sa.Column('id', sa.String(length=128), nullable=False),
    sa.Column('model_id', sa.String(length=128), nullable=False),
    sa.Column('calibration_id', sa.String(length=128), nullable=True),
    sa.Column('model_ref', sa.JSON(), nullable=False),
    sa.Column('calibration_ref', sa.JSON(), nullable=False),
    sa.Column('estimator', sa.String(length=64), nullable=False),
    sa.Column('device', sa.String(length=64), nullable=False),
    sa.Column('options', sa.JSON(), nullable=False),
    sa.Column('modules', sa.LargeBinary(), nullable=False),
    sa.Column('error', sa.LargeBinary(), nullable=False),
    sa.Column('size_bits', sa.LargeBinary(), nullable=False),
    sa.Column('fixed_bits', sa.BigInteger(), nullable=False),
    sa.Column('seconds', sa.Double(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['calibration_id'], ['calibration_sets.id'], name=op.f('fk_profiles_calibration_id_calibration_sets')),
    sa.ForeignKeyConstraint(['model_id'], ['models.id'], name=op.f('fk_profiles_model_id_models')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_profiles'))
    )
    op.create_index(op.f('ix_profiles_calibration_id'), 'profiles', ['calibration_id'])
    op.create_index(op.f('ix_profiles_created_at'), 'profiles', ['created_at'])
    op.create_index(op.f('ix_profiles_model_id'), 'profiles', ['model_id'])
    op.create_table('plans',
    sa.Column('id', sa.String(length=128), nullable=False),
    sa.Column('profile_id', sa.String(length=128), nullable=False),
    sa.Column('model_ref', sa.JSON(), nullable=False),
    sa.Column('budget', sa.String(length=128), nullable=False),
    sa.Column('budget_bits', sa.BigInteger(), nullable=False),
    sa.Column('allocator', sa.String(length=64), nullable=False),
    sa.Column('params', sa.JSON(), nullable=False),
    sa.Column('pins', sa.JSON(), nullable=False),
    sa.Column('status', sa.String(length=128), nullable=False),
    sa.Column('total_bits', sa.BigInteger(), nullable=False),
    sa.Column('fixed_bits', sa.BigInteger(), nullable=False),
    sa.Column('n_params', sa.BigInteger(), nullable=False),
    sa.Column('bits_per_weight', sa.Double(), nullable=False),
    sa.Column('predicted_error', sa.Double(), nullable=False),
    sa.Column('solve_seconds', sa.Double(), nullable=False),
    sa.Column('assignment', sa.JSON(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['profile_id'], ['profiles.id'], name=op.f('fk_plans_profile_id_profiles')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_plans'))
    )
    op.create_index(op.f('ix_plans_created_at'), 'plans', ['created_at'])
    op.create_index(op.f('ix_plans_profile_id'), 'plans', ['profile_id'])
    op.create_table('evaluations',
    sa.Column('id', sa.String(length=128), nullable=False),
    sa.Column('plan_id', sa.String(length=128), nullable=True),
    sa.Column('checkpoint', sa.Text(), nullable=False),
    sa.Column('corpus', sa.String(length=512), nullable=False),
    sa.Column('n_tokens', sa.BigInteger(), nullable=False),
    sa.Column('window', sa.BigInteger(), nullable=False),
    sa.Column('perplexity', sa.Double(), nullable=False),
    sa.Column('bytes_on_disk', sa.BigInteger(), nullable=False),
    sa.Column('device', sa.String(length=64), nullable=False),
    sa.Column('seconds', sa.Double(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['plan_id'], ['plans.id'], name=op.f('fk_evaluations_plan_id_plans')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_evaluations'))
    )
    op.create_index(op.f('ix_evaluations_created_at'), 'evaluations', ['created_at'])
    op.create_index(op.f('ix_evaluations_plan_id'), 'evaluations', ['plan_id'])


def downgrade() -> None:
    # Children before parents; dropping a table drops its indexes.
    for table in ("evaluations", "plans", "profiles", "models", "jobs", "calibration_sets"):
        op.drop_table(table)
