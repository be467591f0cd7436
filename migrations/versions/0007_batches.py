"""Batches: one script over many inputs, owned by an account; each execution may belong to
one, and says when it was handed to the queue (a batch releases at most ``parallel`` at once)
and whether a retry replaced it.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-22
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "batches",
        sa.Column("id", sa.String(16), primary_key=True),
        sa.Column(
            "account_id",
            sa.Integer(),
            sa.ForeignKey("accounts.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("script_name", sa.String(255), nullable=False),
        sa.Column("script_hash", sa.String(64), nullable=False),
        sa.Column("runtime", sa.String(40), nullable=False),
        sa.Column("parallel", sa.Integer(), nullable=True),
        sa.Column("template", sa.JSON(), nullable=False),
        sa.Column("next_index", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("cancelled_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index("ix_batches_account_id", "batches", ["account_id"])
    op.create_index("ix_batches_created_at", "batches", ["created_at"])
    with op.batch_alter_table("executions") as batch:
        batch.add_column(sa.Column("batch_id", sa.String(16), nullable=True))
        batch.add_column(sa.Column("batch_item", sa.String(1024), nullable=True))
        batch.add_column(sa.Column("dispatched_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(
            sa.Column("superseded", sa.Boolean(), nullable=False, server_default=sa.false())
        )
        batch.create_foreign_key(
            "fk_executions_batch_id", "batches", ["batch_id"], ["id"], ondelete="CASCADE"
        )
        batch.create_index("ix_executions_batch_id", ["batch_id"])


def downgrade() -> None:
    with op.batch_alter_table("executions") as batch:
        batch.drop_index("ix_executions_batch_id")
        batch.drop_constraint("fk_executions_batch_id", type_="foreignkey")
        batch.drop_column("superseded")
        batch.drop_column("dispatched_at")
        batch.drop_column("batch_item")
        batch.drop_column("batch_id")
    op.drop_index("ix_batches_created_at", "batches")
    op.drop_index("ix_batches_account_id", "batches")
    op.drop_table("batches")
