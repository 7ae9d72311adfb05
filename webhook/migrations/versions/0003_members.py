"""member cards: members, activation requests, membership number sequence

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

IdType = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "members",
        sa.Column("id", IdType, primary_key=True, autoincrement=True),
        sa.Column("card_id", sa.Text(), nullable=False),
        sa.Column("code", sa.Text(), nullable=False),
        sa.Column("membership_number", sa.Text()),
        sa.Column("mp_openid", sa.Text()),
        sa.Column("oa_openid", sa.Text()),
        sa.Column("source", sa.String(16)),
        sa.Column("data_enc", sa.Text()),
        sa.Column("bonus", sa.BigInteger()),
        sa.Column("balance", sa.BigInteger()),
        sa.Column("activated_at", TS),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_members"),
        sa.UniqueConstraint("card_id", "code", name="uq_members_card_id_code"),
        sa.UniqueConstraint("card_id", "membership_number", name="uq_members_card_id_membership_number"),
    )
    op.create_index("ix_members_mp_openid", "members", ["mp_openid"])
    op.create_table(
        "activations",
        sa.Column("id", IdType, primary_key=True, autoincrement=True),
        sa.Column("dedupe_key", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("card_id", sa.Text(), nullable=False),
        sa.Column("encrypt_code", sa.Text(), nullable=False),
        sa.Column("code", sa.Text()),
        sa.Column("mp_openid", sa.Text(), nullable=False),
        sa.Column("activate_ticket", sa.Text()),
        sa.Column("fields_enc", sa.Text()),
        sa.Column("result", sa.String(16)),
        sa.Column("errcode", sa.Integer()),
        sa.Column("errmsg", sa.Text()),
        sa.Column("membership_number", sa.Text()),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("job_id", sa.String(64)),
        sa.Column("last_error", sa.Text()),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_activations"),
        sa.UniqueConstraint("dedupe_key", name="uq_activations_dedupe_key"),
    )
    op.create_index("ix_activations_status_id", "activations", ["status", "id"])
    op.create_index("ix_activations_card_id_code", "activations", ["card_id", "code"])
    op.create_index("ix_activations_job_id", "activations", ["job_id"])
    op.create_table(
        "membership_numbers",
        sa.Column("id", IdType, primary_key=True, autoincrement=True),
        sa.Column("card_id", sa.Text(), nullable=False),
        sa.Column("code", sa.Text(), nullable=False),
        sa.Column("assigned_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_membership_numbers"),
        sqlite_autoincrement=True,
    )


def downgrade() -> None:
    op.drop_table("membership_numbers")
    op.drop_table("activations")
    op.drop_table("members")
