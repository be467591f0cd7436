"""Accounts, API keys, executions and the script cache.

Revision ID: 0001
Revises:
Create Date: 2026-11-21
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "accounts",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("name", sa.String(100), nullable=False, unique=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "api_keys",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column(
            "account_id",
            sa.Integer(),
            sa.ForeignKey("accounts.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("prefix", sa.String(16), nullable=False),
        sa.Column("key_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index("ix_api_keys_account_id", "api_keys", ["account_id"])
    op.create_table(
        "executions",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column(
            "account_id",
            sa.Integer(),
            sa.ForeignKey("accounts.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("outcome", sa.String(20), nullable=True),
        sa.Column("runtime", sa.String(40), nullable=False),
        sa.Column("script_name", sa.String(255), nullable=False),
        sa.Column("script_hash", sa.String(64), nullable=False),
        sa.Column("dependency_hash", sa.String(64), nullable=True),
        sa.Column("input_hash", sa.String(64), nullable=True),
        sa.Column("args", sa.JSON(), nullable=False),
        sa.Column("timeout_s", sa.Integer(), nullable=False),
        sa.Column("image_ref", sa.String(200), nullable=True),
        sa.Column("script_cache_hit", sa.Boolean(), nullable=False),
        sa.Column("dependency_cache_hit", sa.Boolean(), nullable=False),
        sa.Column("input_cache_hit", sa.Boolean(), nullable=False),
        sa.Column("bytes_uploaded", sa.BigInteger(), nullable=False),
        sa.Column("exit_code", sa.Integer(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("outputs", sa.JSON(), nullable=False),
        sa.Column("build_s", sa.Float(), nullable=True),
        sa.Column("run_s", sa.Float(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index("ix_executions_account_id", "executions", ["account_id"])
    op.create_index("ix_executions_status", "executions", ["status"])
    op.create_table(
        "script_cache",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column(
            "account_id",
            sa.Integer(),
            sa.ForeignKey("accounts.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("runtime", sa.String(40), nullable=False),
        sa.Column("dependency_hash", sa.String(64), nullable=False),
        sa.Column("script_hash", sa.String(64), nullable=False),
        sa.Column("image_ref", sa.String(200), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("use_count", sa.Integer(), nullable=False),
        sa.UniqueConstraint(
            "account_id", "runtime", "dependency_hash", "script_hash", name="uq_script_cache_key"
        ),
    )
    op.create_index("ix_script_cache_last_used_at", "script_cache", ["last_used_at"])


def downgrade() -> None:
    op.drop_table("script_cache")
    op.drop_table("executions")
    op.drop_table("api_keys")
    op.drop_table("accounts")
