"""Content-addressed blobs per account, uploads in progress, and execution input manifests.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-21
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "blobs",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column(
            "account_id",
            sa.Integer(),
            sa.ForeignKey("accounts.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("digest", sa.String(64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("object_key", sa.String(300), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("use_count", sa.Integer(), nullable=False),
        sa.UniqueConstraint("account_id", "digest", name="uq_blob_account_digest"),
    )
    op.create_index("ix_blobs_last_used_at", "blobs", ["last_used_at"])
    op.create_table(
        "uploads",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column(
            "account_id",
            sa.Integer(),
            sa.ForeignKey("accounts.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("digest", sa.String(64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("object_key", sa.String(300), nullable=False),
        sa.Column("multipart_id", sa.String(200), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_uploads_created_at", "uploads", ["created_at"])
    with op.batch_alter_table("executions") as batch:
        batch.add_column(sa.Column("inputs", sa.JSON(), nullable=False, server_default="[]"))
        batch.add_column(
            sa.Column("files_uploaded", sa.Integer(), nullable=False, server_default="0")
        )


def downgrade() -> None:
    with op.batch_alter_table("executions") as batch:
        batch.drop_column("files_uploaded")
        batch.drop_column("inputs")
    op.drop_index("ix_uploads_created_at", "uploads")
    op.drop_table("uploads")
    op.drop_index("ix_blobs_last_used_at", "blobs")
    op.drop_table("blobs")
