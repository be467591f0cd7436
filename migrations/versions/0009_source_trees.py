"""A script is a source tree: the local modules shipped with it and the tree's digest (the
script part of the script cache's key).

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("executions") as batch:
        batch.add_column(sa.Column("sources", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("source_digest", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("module", sa.String(length=255), nullable=True))
        batch.add_column(sa.Column("dependency_source", sa.String(length=300), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("executions") as batch:
        batch.drop_column("dependency_source")
        batch.drop_column("module")
        batch.drop_column("source_digest")
        batch.drop_column("sources")
