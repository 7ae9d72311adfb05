"""Reconciliation: join Official Account pushes and Mini Program records per card.

Both sides meet on one `cards` row per (card_id, real code). Every write here
is idempotent and order independent: a field is filled once and never
overwritten with another value, and a status moves only to a later one (by
Weixin's CreateTime, then by rank), so either side may arrive first, any number
of times, on any worker, and the result is the same.
"""
from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import and_, func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from webhook.cardstore import STATUS_RANK, TERMINAL, CardStatus, Match, cards, mp_records
from webhook.store import utcnow

log = logging.getLogger("wxcoupon.reconcile")

# Weixin's user_card_status (card/code/get) in our vocabulary.
WEIXIN_STATUS = {
    "NORMAL": CardStatus.RECEIVED,
    "CONSUMED": CardStatus.CONSUMED,
    "EXPIRE": CardStatus.EXPIRED,
    "GIFTING": CardStatus.GIFTING,
    "GIFT_SUCC": CardStatus.GIFTED,
    "GIFT_TIMEOUT": CardStatus.RECEIVED,
    "DELETE": CardStatus.DELETED,
    "UNAVAILABLE": CardStatus.DELETED,
}

# Fields that are filled once: the first non-empty value stays.
FILL_ONCE = ("oa_openid", "mp_openid", "unionid", "outer_str", "old_code", "new_code", "origin", "received_time")


def status_key(status: str | None, time: int | None) -> tuple[int, int, int, str]:
    """The order of card states: terminal last, then later time, then rank, then name.

    Applying the maximum of this key is what makes the final state independent
    of the order in which events arrive.
    """
    if status is None:
        return (-1, -1, -1, "")
    state = CardStatus(status)
    return (1 if state in TERMINAL else 0, int(time or 0), STATUS_RANK[state], state.value)


def _insert(conn: Connection) -> Any:
    return (postgresql if conn.dialect.name == "postgresql" else sqlite).insert(cards)


def lock_card(conn: Connection, card_id: str, code: str) -> dict[str, Any]:
    """The card row for (card_id, code), created if missing, locked for this transaction."""
    now = utcnow()
    conn.execute(
        _insert(conn)
        .values(card_id=card_id, code=code, created_at=now, updated_at=now)
        .on_conflict_do_nothing(index_elements=["card_id", "code"])
    )
    stmt = select(cards).where(cards.c.card_id == card_id, cards.c.code == code)
    if conn.dialect.name == "postgresql":
        stmt = stmt.with_for_update()  # SQLite already holds its write lock (BEGIN IMMEDIATE)
    return dict(conn.execute(stmt).mappings().one())


def update_card(
    conn: Connection,
    card_id: str,
    code: str,
    *,
    status: CardStatus | None = None,
    status_time: int | None = None,
    **fields: Any,
) -> dict[str, Any]:
    """Fill empty fields and move the status forward; return the card as it is now."""
    card = lock_card(conn, card_id, code)
    changes: dict[str, Any] = {}
    for name, value in fields.items():
        if name not in FILL_ONCE:
            raise ValueError(f"{name} is not a fill-once card field")
        if value not in (None, "") and card[name] in (None, ""):
            changes[name] = value
    if status is not None and status_key(status.value, status_time) > status_key(card["status"], card["status_time"]):
        changes["status"] = status.value
        changes["status_time"] = status_time
    if changes:
        changes["updated_at"] = utcnow()
        conn.execute(update(cards).where(cards.c.id == card["id"]).values(**changes))
        card.update(changes)
    return card


def settle_waiting_records(conn: Connection, card: dict[str, Any]) -> int:
    """Mark Mini Program records of this card matched once its Official Account side is known."""
    if card.get("origin") is None:
        return 0
    match = Match.RECOVERED if card["origin"] == "recovered" else Match.MATCHED
    result = conn.execute(
        update(mp_records)
        .where(
            mp_records.c.card_id == card["card_id"],
            mp_records.c.code == card["code"],
            mp_records.c.match == Match.WAITING.value,
        )
        .values(match=match.value, updated_at=utcnow())
    )
    return int(result.rowcount or 0)


def match_for(card: dict[str, Any]) -> Match:
    """Where a decoded record of this card stands right now."""
    if card.get("origin") == "recovered":
        return Match.RECOVERED
    return Match.MATCHED if card.get("origin") == "push" else Match.WAITING


def report(conn: Connection, unmatched_limit: int = 100) -> dict[str, Any]:
    """Counts of the reconciliation and the unmatched items."""
    counts = {m.value: 0 for m in Match}
    for match, n in conn.execute(select(mp_records.c.match, func.count()).group_by(mp_records.c.match)).all():
        if match is not None:
            counts[str(match)] = int(n)
    undecoded = conn.execute(
        select(func.count()).select_from(mp_records).where(mp_records.c.match.is_(None))
    ).scalar_one()
    oa_only = conn.execute(
        select(func.count())
        .select_from(cards)
        .where(and_(cards.c.origin.is_not(None), cards.c.mp_openid.is_(None)))
    ).scalar_one()
    items = conn.execute(
        select(
            mp_records.c.id, mp_records.c.kind, mp_records.c.card_id, mp_records.c.code,
            mp_records.c.mp_openid, mp_records.c.last_error, mp_records.c.checked_at,
        )
        .where(mp_records.c.match == Match.UNMATCHED.value)
        .order_by(mp_records.c.id)
        .limit(unmatched_limit)
    ).mappings()
    return {
        **counts,
        "undecoded": int(undecoded),
        "oa_only": int(oa_only),
        "unmatched_items": [dict(i) for i in items],
    }
