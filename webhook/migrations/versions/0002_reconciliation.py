"""event attempts, card state and Mini Program records (reconciliation)

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

IdType = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "event_attempts",
        sa.Column("id", IdType, primary_key=True, autoincrement=True),
        sa.Column("event_id", IdType, sa.ForeignKey("events.id", ondelete="CASCADE"), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.String(64)),
        sa.Column("worker", sa.Text()),
        sa.Column("started_at", TS, nullable=False),
        sa.Column("finished_at", TS, nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("error", sa.Text()),
        sa.PrimaryKeyConstraint("id", name="pk_event_attempts"),
    )
    op.create_index("ix_event_attempts_event_id", "event_attempts", ["event_id"])
    op.create_table(
        "cards",
        sa.Column("id", IdType, primary_key=True, autoincrement=True),
        sa.Column("card_id", sa.Text(), nullable=False),
        sa.Column("code", sa.Text(), nullable=False),
        sa.Column("status", sa.String(16)),
        sa.Column("status_time", sa.BigInteger()),
        sa.Column("oa_openid", sa.Text()),
        sa.Column("mp_openid", sa.Text()),
        sa.Column("unionid", sa.Text()),
        sa.Column("outer_str", sa.Text()),
        sa.Column("old_code", sa.Text()),
        sa.Column("new_code", sa.Text()),
        sa.Column("origin", sa.String(16)),
        sa.Column("received_time", sa.BigInteger()),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_cards"),
        sa.UniqueConstraint("card_id", "code", name="uq_cards_card_id"),
    )
    op.create_index("ix_cards_mp_openid", "cards", ["mp_openid"])
    op.create_index("ix_cards_oa_openid", "cards", ["oa_openid"])
    op.create_table(
        "mp_records",
        sa.Column("id", IdType, primary_key=True, autoincrement=True),
        sa.Column("dedupe_key", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("card_id", sa.Text(), nullable=False),
        sa.Column("encrypt_code", sa.Text(), nullable=False),
        sa.Column("code", sa.Text()),
        sa.Column("mp_openid", sa.Text()),
        sa.Column("oa_openid", sa.Text()),
        sa.Column("unionid", sa.Text()),
        sa.Column("is_success", sa.Boolean(), nullable=False),
        sa.Column("match", sa.String(16)),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("job_id", sa.String(64)),
        sa.Column("last_error", sa.Text()),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.Column("decoded_at", TS),
        sa.Column("checked_at", TS),
        sa.PrimaryKeyConstraint("id", name="pk_mp_records"),
        sa.UniqueConstraint("dedupe_key", name="uq_mp_records_dedupe_key"),
    )
    op.create_index("ix_mp_records_status_id", "mp_records", ["status", "id"])
    op.create_index("ix_mp_records_card_id_code", "mp_records", ["card_id", "code"])
    op.create_index("ix_mp_records_match_decoded_at", "mp_records", ["match", "decoded_at"])
    op.create_index("ix_mp_records_mp_openid", "mp_records", ["mp_openid"])
    op.create_index("ix_mp_records_job_id", "mp_records", ["job_id"])


def downgrade() -> None:
    op.drop_table("mp_records")
    op.drop_table("cards")
    op.drop_table("event_attempts")
