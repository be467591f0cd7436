"""What a user may choose per run: memory and CPU limits, piped stdin, environment variables
(their names only: values are secrets and never reach the database).

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-22
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("executions") as batch:
        batch.add_column(sa.Column("memory_bytes", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("cpus", sa.Float(), nullable=True))
        batch.add_column(
            sa.Column("stdin", sa.Boolean(), nullable=False, server_default=sa.false())
        )
        batch.add_column(sa.Column("env_names", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("executions") as batch:
        batch.drop_column("env_names")
        batch.drop_column("stdin")
        batch.drop_column("cpus")
        batch.drop_column("memory_bytes")
