"""Alembic's environment and versions, installed beside ``rgrid`` so that an installed RGrid
(the embedded default, ``rgrid.core.db.upgrade``) finds them without a checkout."""
