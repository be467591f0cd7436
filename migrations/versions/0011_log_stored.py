"""Whether an execution's log was stored in the object store, so that a log missing from the
store can be told apart from one that was never written (a batch execution cancelled before
it was queued, an execution the sweep ended): the first is lost and `rgrid logs` says so.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

#: Rows from before this column whose log the pipeline stored: every finished one except those
#: ended without a pipeline step (a batch's queued execution cancelled in bulk, the sweep's
#: "lost" executions). Their log is then expected in the store.
BACKFILL = """
UPDATE executions SET log_stored = :yes
WHERE finished_at IS NOT NULL
  AND NOT (error IS NOT NULL AND error LIKE 'lost:%')
  AND NOT (batch_id IS NOT NULL AND started_at IS NULL AND status = 'cancelled')
"""


def upgrade() -> None:
    with op.batch_alter_table("executions") as batch:
        batch.add_column(
            sa.Column("log_stored", sa.Boolean(), nullable=False, server_default=sa.false())
        )
    op.execute(sa.text(BACKFILL).bindparams(yes=True))


def downgrade() -> None:
    with op.batch_alter_table("executions") as batch:
        batch.drop_column("log_stored")
