"""Member cards: members, the Mini Program's activation requests, and membership numbers.

`members` holds one row per activated (or form-submitted) member card, keyed
like `cards` by (card_id, real code); the user's form data is only stored
encrypted (`data_enc`, see pii.py). `activations` is an outbox like `events`
and `mp_records`: the Mini Program's activation and registration requests,
moved to RQ by the same dispatcher. `membership_numbers` is a portable,
never-reused sequence: an autoincrement id that neither SQLite (AUTOINCREMENT)
nor PostgreSQL (identity) hands out twice, even after a rollback or a delete.
"""
from __future__ import annotations

import enum
import hashlib
import json
from typing import Any

from sqlalchemy import BigInteger, Column, DateTime, Index, Integer, String, Table, Text, UniqueConstraint, select
from sqlalchemy.engine import Connection

from .store import IdType, insert_once, metadata, work_columns

MAX_MEMBERSHIP_NUMBER = 20  # Weixin: membership_number string(20)
MAX_CODE = 20  # Weixin: code string(20)
MAX_CARD_ID = 32  # Weixin: card_id string(32)
PLUGIN_APPID = "wxeb490c6f9b154ef9"  # the activation plug-in's appid; fixed by Weixin

# Weixin's own form fields (common_field_id_list). The seed's field tables list
# the education field as ..._EDUCATION_BACKGRO (both tables), its sample answer
# shows ..._EDUCATION_BACKGROUND: ..._BACKGRO is what we send; both are read.
COMMON_FIELD_IDS = (
    "USER_FORM_INFO_FLAG_MOBILE",
    "USER_FORM_INFO_FLAG_SEX",
    "USER_FORM_INFO_FLAG_NAME",
    "USER_FORM_INFO_FLAG_BIRTHDAY",
    "USER_FORM_INFO_FLAG_IDCARD",
    "USER_FORM_INFO_FLAG_EMAIL",
    "USER_FORM_INFO_FLAG_LOCATION",
    "USER_FORM_INFO_FLAG_EDUCATION_BACKGRO",
    "USER_FORM_INFO_FLAG_INDUSTRY",
    "USER_FORM_INFO_FLAG_INCOME",
    "USER_FORM_INFO_FLAG_HABIT",
)
FIELD_ID_ALIASES = {"USER_FORM_INFO_FLAG_EDUCATION_BACKGROUND": "USER_FORM_INFO_FLAG_EDUCATION_BACKGRO"}


class MemberSource(str, enum.Enum):
    """How a member's data reached us."""

    REDIRECT = "redirect"  # activation plug-in, redirect-based: activatetempinfo/get, then activate
    NON_REDIRECT = "non_redirect"  # activation plug-in, non-redirect: submit_membercard_user_info push
    REGISTRATION = "registration"  # the Mini Program's own registration page (old Weixin clients)


class ActivationKind(str, enum.Enum):
    """What the Mini Program asked for."""

    REDIRECT = "redirect"  # with an activate_ticket from the plug-in
    REGISTRATION = "registration"  # with the fields of its own registration page


class ActivationResult(str, enum.Enum):
    """How an activation request ended (None while it is in progress)."""

    ACTIVATED = "activated"
    FAILED = "failed"


members = Table(
    "members",
    metadata,
    Column("id", IdType, primary_key=True, autoincrement=True),
    Column("card_id", Text, nullable=False),
    Column("code", Text, nullable=False),
    Column("membership_number", Text),
    Column("mp_openid", Text),
    Column("oa_openid", Text),
    Column("source", String(16)),
    Column("data_enc", Text),  # Fernet token of {common_field_list, custom_field_list, ...}
    Column("bonus", BigInteger),
    Column("balance", BigInteger),
    Column("activated_at", DateTime(timezone=True)),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("card_id", "code", name="uq_members_card_id_code"),
    # Per card: with WXCOUPON_MEMBERSHIP_NUMBER=code two cards may share a code.
    UniqueConstraint("card_id", "membership_number", name="uq_members_card_id_membership_number"),
    Index(None, "mp_openid"),
)

activations = Table(
    "activations",
    metadata,
    Column("id", IdType, primary_key=True, autoincrement=True),
    Column("dedupe_key", String(64), nullable=False, unique=True),
    Column("kind", String(16), nullable=False),
    Column("card_id", Text, nullable=False),
    Column("encrypt_code", Text, nullable=False),
    Column("code", Text),
    Column("mp_openid", Text, nullable=False),
    Column("activate_ticket", Text),  # redirect kind only; never logged
    Column("fields_enc", Text),  # registration kind only: Fernet token of the form
    Column("result", String(16)),
    Column("errcode", Integer),
    Column("errmsg", Text),
    Column("membership_number", Text),
    *work_columns(),  # the same outbox moves requests and events
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Index(None, "card_id", "code"),
)

membership_numbers = Table(
    "membership_numbers",
    metadata,
    Column("id", IdType, primary_key=True, autoincrement=True),
    Column("card_id", Text, nullable=False),
    Column("code", Text, nullable=False),
    Column("assigned_at", DateTime(timezone=True), nullable=False),
    sqlite_autoincrement=True,  # never reuse an id, even the highest one after a delete
)


def activation_key(kind: ActivationKind, *parts: str | None) -> str:
    """Dedupe key of an activation request: a retried call stores nothing new."""
    raw = json.dumps([kind.value, *parts], ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(raw.encode("utf-8")).hexdigest()


def insert_activation(conn: Connection, row: dict[str, Any]) -> int:
    """Insert an activation request unless its dedupe key exists; return its id either way."""
    return insert_once(conn, activations, row)


def get_activation(conn: Connection, activation_id: int) -> dict[str, Any] | None:
    """One activation request as a dict, or None."""
    row = conn.execute(select(activations).where(activations.c.id == activation_id)).mappings().first()
    return dict(row) if row is not None else None


def field_list(values: dict[str, Any]) -> list[dict[str, Any]]:
    """A {name: value} form as Weixin's [{name, value}] / [{name, value_list}] list."""
    out: list[dict[str, Any]] = []
    for name, value in values.items():
        if isinstance(value, list):
            out.append({"name": name, "value_list": list(value)})
        else:
            out.append({"name": name, "value": value})
    return out
