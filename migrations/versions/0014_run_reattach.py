"""How many times the lease sweep has sent an execution's run step back to its host (a
lost runner's successor re-attaches to the sandbox, up to a bound), and what its stored log
lacks, if anything (said in the summary, not only in the log).

Revision ID: 0014
Revises: 0011
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("executions") as batch:
        batch.add_column(sa.Column("run_resends", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("log_incomplete", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("executions") as batch:
        batch.drop_column("log_incomplete")
        batch.drop_column("run_resends")
