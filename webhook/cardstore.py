"""Card state and Mini Program records: the two sides that reconciliation joins.

A card is identified by (card_id, real code). Official Account pushes tell who
holds it in the Official Account (oa_openid) and what happened to it; the Mini
Program tells who holds it there (mp_openid) through records whose codes are
encrypted until a worker decodes them.
"""
from __future__ import annotations

import enum
from typing import Any

from sqlalchemy import BigInteger, Boolean, Column, DateTime, Index, String, Table, Text, UniqueConstraint

from .store import IdType, metadata, work_columns


class CardStatus(str, enum.Enum):
    """A card's state as Weixin reported it; later ranks never move back."""

    RECEIVED = "received"
    ACTIVATED = "activated"
    GIFTING = "gifting"
    GIFTED = "gifted"
    CONSUMED = "consumed"
    DELETED = "deleted"
    EXPIRED = "expired"


# Within one second, a higher rank wins; terminal states are final.
STATUS_RANK = {
    CardStatus.RECEIVED: 1,
    CardStatus.ACTIVATED: 2,
    CardStatus.GIFTING: 3,
    CardStatus.GIFTED: 4,
    CardStatus.CONSUMED: 4,
    CardStatus.DELETED: 4,
    CardStatus.EXPIRED: 4,
}
TERMINAL = frozenset(s for s, rank in STATUS_RANK.items() if rank == 4)


class RecordKind(str, enum.Enum):
    """Where a Mini Program record came from."""

    RECEIPT = "receipt"  # the result of wx.addCard
    ENTRY = "entry"  # a user arrived from a coupon's Mini Program entry (seed flow 4)


class Match(str, enum.Enum):
    """Where a Mini Program record stands against the Official Account side."""

    WAITING = "waiting"  # decoded; no push for the code yet
    MATCHED = "matched"  # the push for the code is here
    RECOVERED = "recovered"  # no push came; Weixin's card/code/get confirmed the code
    UNMATCHED = "unmatched"  # no push, and Weixin does not know the code either
    IGNORED = "ignored"  # wx.addCard reported is_success false: nothing to match


cards = Table(
    "cards",
    metadata,
    Column("id", IdType, primary_key=True, autoincrement=True),
    Column("card_id", Text, nullable=False),
    Column("code", Text, nullable=False),
    Column("status", String(16)),  # None: only the Mini Program side is known yet
    Column("status_time", BigInteger),  # Weixin CreateTime of the event that set status
    Column("oa_openid", Text),
    Column("mp_openid", Text),
    Column("unionid", Text),
    Column("outer_str", Text),
    Column("old_code", Text),  # the code this card was gifted from
    Column("new_code", Text),  # the code it was gifted to
    Column("origin", String(16)),  # push | recovered
    Column("received_time", BigInteger),  # CreateTime of the user_get_card push
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("card_id", "code"),
    Index(None, "mp_openid"),
    Index(None, "oa_openid"),
)

mp_records = Table(
    "mp_records",
    metadata,
    Column("id", IdType, primary_key=True, autoincrement=True),
    Column("dedupe_key", String(64), nullable=False, unique=True),
    Column("kind", String(16), nullable=False),
    Column("card_id", Text, nullable=False),
    Column("encrypt_code", Text, nullable=False),
    Column("code", Text),
    Column("mp_openid", Text),
    Column("oa_openid", Text),
    Column("unionid", Text),
    Column("is_success", Boolean, nullable=False),
    Column("match", String(16)),
    *work_columns(),  # the same outbox moves records and events
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Column("decoded_at", DateTime(timezone=True)),
    Column("checked_at", DateTime(timezone=True)),
    Index(None, "card_id", "code"),
    Index(None, "match", "decoded_at"),
    Index(None, "mp_openid"),
)


def card_key(row: dict[str, Any]) -> tuple[str, str]:
    """The (card_id, code) a row is about."""
    return str(row["card_id"]), str(row["code"])
