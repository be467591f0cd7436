"""Small outputs packed: a blob row may point into a pack object, its bytes at ``pack_offset``
(its ``size`` the length) of the object at ``object_key``, which holds many blobs. None: the
object is the blob's alone, as before. The object key is indexed: a pack is deleted only when
no row points into it any more.

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("blobs") as batch:
        batch.add_column(sa.Column("pack_offset", sa.BigInteger(), nullable=True))
    op.create_index("ix_blobs_object_key", "blobs", ["object_key"])


def downgrade() -> None:
    # A packed blob's row cannot name its bytes without an offset: those rows go (their
    # outputs are then lost, as after any purge; a repeat run stores them again).
    op.execute(sa.text("DELETE FROM blobs WHERE pack_offset IS NOT NULL"))
    op.drop_index("ix_blobs_object_key", table_name="blobs")
    with op.batch_alter_table("blobs") as batch:
        batch.drop_column("pack_offset")
