"""Instant repeats: the output cache (a succeeded run's result by its action key) and, on each
execution, its action key's parts, the run it was answered from and whether the cache hit.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "output_cache",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column(
            "account_id",
            sa.Integer(),
            sa.ForeignKey("accounts.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("action_key", sa.String(length=64), nullable=False),
        sa.Column("execution_id", sa.String(length=32), nullable=False),
        sa.Column("outputs", sa.JSON(), nullable=False),
        sa.Column("exit_code", sa.Integer(), nullable=False),
        sa.Column("run_s", sa.Float(), nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("use_count", sa.Integer(), nullable=False),
        sa.UniqueConstraint("account_id", "action_key", name="uq_output_cache_key"),
    )
    op.create_index("ix_output_cache_last_used_at", "output_cache", ["last_used_at"])
    with op.batch_alter_table("executions") as batch:
        batch.add_column(sa.Column("action_parts", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("action_key", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("reused_from", sa.String(length=32), nullable=True))
        batch.add_column(sa.Column("output_cache_hit", sa.Boolean(), nullable=True))
        batch.create_index("ix_executions_reused_from", ["reused_from"])


def downgrade() -> None:
    with op.batch_alter_table("executions") as batch:
        batch.drop_index("ix_executions_reused_from")
        batch.drop_column("output_cache_hit")
        batch.drop_column("reused_from")
        batch.drop_column("action_key")
        batch.drop_column("action_parts")
    op.drop_index("ix_output_cache_last_used_at", table_name="output_cache")
    op.drop_table("output_cache")
