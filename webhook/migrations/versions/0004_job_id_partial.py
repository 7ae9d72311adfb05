"""job_id indexes cover only rows that have a job

A row is stored with job_id NULL and keeps that until the dispatcher queues
it; every query by job_id asks for a value (=, IN, IS NOT NULL). A partial
index leaves the new rows out, so a push's INSERT updates one index fewer
(one B-tree page and one WAL frame fewer on SQLite per commit).

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-26
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

TABLES = ("events", "mp_records", "activations")
HAS_JOB = sa.text("job_id IS NOT NULL")


def upgrade() -> None:
    for table in TABLES:
        op.drop_index(f"ix_{table}_job_id", table_name=table)
        op.create_index(f"ix_{table}_job_id", table, ["job_id"], sqlite_where=HAS_JOB, postgresql_where=HAS_JOB)


def downgrade() -> None:
    for table in TABLES:
        op.drop_index(f"ix_{table}_job_id", table_name=table)
        op.create_index(f"ix_{table}_job_id", table, ["job_id"])
