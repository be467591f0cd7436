"""The dependency cache, and what an execution records of its dependencies.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-21
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "dependency_cache",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column(
            "account_id",
            sa.Integer(),
            sa.ForeignKey("accounts.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("runtime", sa.String(40), nullable=False),
        sa.Column("dependency_hash", sa.String(64), nullable=False),
        sa.Column("image_ref", sa.String(200), nullable=False),
        sa.Column("resolved", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("use_count", sa.Integer(), nullable=False),
        sa.UniqueConstraint(
            "account_id", "runtime", "dependency_hash", name="uq_dependency_cache_key"
        ),
    )
    op.create_index("ix_dependency_cache_last_used_at", "dependency_cache", ["last_used_at"])
    with op.batch_alter_table("executions") as batch:
        batch.add_column(sa.Column("requirements", sa.Text(), nullable=False, server_default=""))
        batch.add_column(
            sa.Column("refresh_deps", sa.Boolean(), nullable=False, server_default=sa.false())
        )
        batch.add_column(sa.Column("dependency_image", sa.String(200), nullable=True))
        batch.add_column(sa.Column("resolved_dependencies", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("deps_build_s", sa.Float(), nullable=True))
    with op.batch_alter_table("script_cache") as batch:
        batch.add_column(sa.Column("base_image", sa.String(200), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("script_cache") as batch:
        batch.drop_column("base_image")
    with op.batch_alter_table("executions") as batch:
        for column in (
            "deps_build_s",
            "resolved_dependencies",
            "dependency_image",
            "refresh_deps",
            "requirements",
        ):
            batch.drop_column(column)
    op.drop_index("ix_dependency_cache_last_used_at", "dependency_cache")
    op.drop_table("dependency_cache")
