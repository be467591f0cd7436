"""Environments, not images: caches point at installed dependency folders, scripts are data.

The script cache's value was a per-script image and the dependency cache's a dependency image;
neither exists any more and neither can be derived from the new values, so their rows are
dropped (the next run of each script repopulates them at the cost of one environment install).
Executions keep their history; the image columns they no longer use go.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-22
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("DELETE FROM script_cache")
    op.execute("DELETE FROM dependency_cache")
    with op.batch_alter_table("script_cache") as batch:
        batch.drop_column("image_ref")
        batch.drop_column("base_image")
        batch.add_column(sa.Column("environment", sa.String(64), nullable=True))
        batch.add_column(sa.Column("runtime_image", sa.String(80), nullable=True))
    with op.batch_alter_table("dependency_cache") as batch:
        batch.drop_column("image_ref")
        batch.add_column(sa.Column("environment", sa.String(64), nullable=True))
    with op.batch_alter_table("executions") as batch:
        batch.drop_column("image_ref")
        batch.drop_column("dependency_image")
        batch.drop_column("build_s")
        batch.add_column(sa.Column("environment", sa.String(64), nullable=True))
        batch.add_column(sa.Column("runtime_image", sa.String(80), nullable=True))
        batch.add_column(sa.Column("sandbox_warm", sa.Boolean(), nullable=True))
        # No dependencies: no dependency cache to hit or miss.
        batch.alter_column("dependency_cache_hit", existing_type=sa.Boolean(), nullable=True)


def downgrade() -> None:
    op.execute("DELETE FROM script_cache")
    op.execute("DELETE FROM dependency_cache")
    op.execute(
        "UPDATE executions SET dependency_cache_hit = false WHERE dependency_cache_hit IS NULL"
    )
    with op.batch_alter_table("executions") as batch:
        batch.alter_column("dependency_cache_hit", existing_type=sa.Boolean(), nullable=False)
        batch.drop_column("sandbox_warm")
        batch.drop_column("runtime_image")
        batch.drop_column("environment")
        batch.add_column(sa.Column("build_s", sa.Float(), nullable=True))
        batch.add_column(sa.Column("dependency_image", sa.String(200), nullable=True))
        batch.add_column(sa.Column("image_ref", sa.String(200), nullable=True))
    with op.batch_alter_table("dependency_cache") as batch:
        batch.drop_column("environment")
        batch.add_column(sa.Column("image_ref", sa.String(200), nullable=False, server_default=""))
    with op.batch_alter_table("script_cache") as batch:
        batch.drop_column("runtime_image")
        batch.drop_column("environment")
        batch.add_column(sa.Column("base_image", sa.String(200), nullable=True))
        batch.add_column(sa.Column("image_ref", sa.String(200), nullable=False, server_default=""))
