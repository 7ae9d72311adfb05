"""Member rows and membership numbers, shared by both activation kinds.

A membership number is assigned once per (card_id, code) and kept on the
member row, so every later attempt at the same card (an RQ retry, a second
activation request, a worker that crashed after Weixin applied the
activation) reuses it. With WXCOUPON_MEMBERSHIP_NUMBER=sequence it is the
prefix plus the id of a fresh `membership_numbers` row: unique across
concurrent workers because the database hands out each id once, and never
reused because neither SQLite's AUTOINCREMENT nor PostgreSQL's identity goes
back.
"""
from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import Engine, select, update
from sqlalchemy.engine import Connection

from webhook.config import Settings
from webhook.members import MAX_MEMBERSHIP_NUMBER, MemberSource, members, membership_numbers
from webhook.pii import DataCipher
from webhook.store import dialect_insert, utcnow, worker_writing

SEQUENCE_DIGITS = 8  # zero-padded width of the sequence part: AAA00000001


class MembershipNumberError(Exception):
    """A membership number Weixin would refuse (longer than 20 characters)."""


def _insert(conn: Connection) -> Any:
    return dialect_insert(conn, members)


def lock_member(conn: Connection, card_id: str, code: str) -> dict[str, Any]:
    """The member row for (card_id, code), created if missing, locked for this transaction."""
    now = utcnow()
    conn.execute(
        _insert(conn)
        .values(card_id=card_id, code=code, created_at=now, updated_at=now)
        .on_conflict_do_nothing(index_elements=["card_id", "code"])
    )
    stmt = select(members).where(members.c.card_id == card_id, members.c.code == code)
    if conn.dialect.name == "postgresql":
        stmt = stmt.with_for_update()  # SQLite already holds its write lock (BEGIN IMMEDIATE)
    return dict(conn.execute(stmt).mappings().one())


def format_number(settings: Settings, sequence: int) -> str:
    """The membership number for a sequence value: prefix + zero-padded digits."""
    number = f"{settings.membership_prefix}{sequence:0{SEQUENCE_DIGITS}d}"
    if len(number) > MAX_MEMBERSHIP_NUMBER:
        raise MembershipNumberError(
            f"membership number would be {len(number)} characters; Weixin takes at most {MAX_MEMBERSHIP_NUMBER} "
            "(shorten WXCOUPON_MEMBERSHIP_PREFIX)"
        )
    return number


def number_for_code(code: str) -> str:
    """The membership number under WXCOUPON_MEMBERSHIP_NUMBER=code."""
    if len(code) > MAX_MEMBERSHIP_NUMBER:
        raise MembershipNumberError(
            f"the code has {len(code)} characters; a membership number takes at most {MAX_MEMBERSHIP_NUMBER} "
            "(use WXCOUPON_MEMBERSHIP_NUMBER=sequence)"
        )
    return code


def assign_number(conn: Connection, settings: Settings, card_id: str, code: str) -> str:
    """The member's membership number, assigned now if it has none (inside the caller's transaction)."""
    member = lock_member(conn, card_id, code)
    if member["membership_number"]:
        return str(member["membership_number"])
    if settings.membership_number == "sequence":
        sequence = conn.execute(
            membership_numbers.insert()
            .values(card_id=card_id, code=code, assigned_at=utcnow())
            .returning(membership_numbers.c.id)
        ).scalar_one()
        number = format_number(settings, int(sequence))
    else:
        number = number_for_code(code)
    conn.execute(
        update(members).where(members.c.id == member["id"]).values(membership_number=number, updated_at=utcnow())
    )
    return number


def assign_membership_number(engine: Engine, settings: Settings, card_id: str, code: str) -> str:
    """Assign (or read back) the membership number in its own short, committed transaction."""
    with worker_writing(engine) as conn:
        return assign_number(conn, settings, card_id, code)


def store_member(
    conn: Connection,
    cipher: DataCipher,
    card_id: str,
    code: str,
    *,
    source: MemberSource,
    data: dict[str, Any] | None,
    membership_number: str | None = None,
    mp_openid: str | None = None,
    oa_openid: str | None = None,
    bonus: int | None = None,
    balance: int | None = None,
    activated_at: dt.datetime | None = None,
    keep_source: bool = False,
) -> dict[str, Any]:
    """Record a member's data (encrypted) and state; fields not given keep their values."""
    member = lock_member(conn, card_id, code)
    changes: dict[str, Any] = {"updated_at": utcnow()}
    if data is not None:
        changes["data_enc"] = cipher.encrypt_json(data)
    if membership_number:
        changes["membership_number"] = membership_number
    if not (keep_source and member["source"]):
        changes["source"] = source.value
    for name, value in (("mp_openid", mp_openid), ("oa_openid", oa_openid)):
        if value and not member[name]:
            changes[name] = value  # filled once, like the card's openids
    for name, number in (("bonus", bonus), ("balance", balance)):
        if number is not None:
            changes[name] = number
    if activated_at is not None and member["activated_at"] is None:
        changes["activated_at"] = activated_at
    conn.execute(update(members).where(members.c.id == member["id"]).values(**changes))
    member.update(changes)
    return member


def get_member(conn: Connection, card_id: str, code: str) -> dict[str, Any] | None:
    """The member row of (card_id, code), or None."""
    row = conn.execute(select(members).where(members.c.card_id == card_id, members.c.code == code)).mappings().first()
    return dict(row) if row is not None else None
