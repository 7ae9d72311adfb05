"""events: the durable store of every accepted push (the outbox too)

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

IdType = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "events",
        sa.Column("id", IdType, primary_key=True, autoincrement=True),
        sa.Column("dedupe_key", sa.String(64), nullable=False),
        sa.Column("msg_type", sa.Text(), nullable=False),
        sa.Column("event", sa.Text()),
        sa.Column("to_user", sa.Text()),
        sa.Column("openid", sa.Text()),
        sa.Column("card_id", sa.Text()),
        sa.Column("code", sa.Text()),
        sa.Column("old_code", sa.Text()),
        sa.Column("outer_str", sa.Text()),
        sa.Column("unionid", sa.Text()),
        sa.Column("create_time", sa.BigInteger()),
        sa.Column("mode", sa.String(8), nullable=False),
        sa.Column("raw_xml", sa.Text(), nullable=False),
        sa.Column("fields", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("job_id", sa.String(64)),
        sa.Column("last_error", sa.Text()),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_events"),
        sa.UniqueConstraint("dedupe_key", name="uq_events_dedupe_key"),
    )
    op.create_index("ix_events_status_id", "events", ["status", "id"])
    op.create_index("ix_events_card_id_code", "events", ["card_id", "code"])
    op.create_index("ix_events_received_at", "events", ["received_at"])
    op.create_index("ix_events_job_id", "events", ["job_id"])


def downgrade() -> None:
    op.drop_table("events")
