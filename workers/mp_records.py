"""Mini Program records: decode their codes, then join them to the card state."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.engine import Connection

from webhook.cardstore import Match, RecordKind, mp_records
from webhook.store import utcnow

from .context import WorkerContext
from .handlers import Handler
from .reconcile import match_for, update_card

Row = dict[str, Any]


def load_records(conn: Connection, ids: Sequence[int]) -> list[Row]:
    """Mini Program records by id, in id order."""
    if not ids:
        return []
    stmt = select(mp_records).where(mp_records.c.id.in_(ids)).order_by(mp_records.c.id)
    return [dict(r) for r in conn.execute(stmt).mappings()]


def fetch_code(ctx: WorkerContext, record: Row) -> str | None:
    """The real code behind the record's encrypted one (card/code/decrypt)."""
    if not record["is_success"]:
        return None
    if record.get("code"):
        return str(record["code"])  # decoded on an earlier attempt
    return ctx.weixin.decrypt_code(record["encrypt_code"])


def apply_code(ctx: WorkerContext, conn: Connection, record: Row, code: str | None) -> None:
    """Record the real code and join the Mini Program holder to the card."""
    now = utcnow()
    if code is None:
        conn.execute(update(mp_records).where(mp_records.c.id == record["id"]).values(match=Match.IGNORED.value))
        return
    oa_openid = record["oa_openid"] if record["kind"] == RecordKind.ENTRY.value else None
    card = update_card(
        conn, record["card_id"], code, mp_openid=record["mp_openid"], unionid=record["unionid"], oa_openid=oa_openid
    )
    conn.execute(
        update(mp_records)
        .where(mp_records.c.id == record["id"])
        .values(code=code, decoded_at=record["decoded_at"] or now, match=match_for(card).value, updated_at=now)
    )


RECORD_HANDLER = Handler(fetch=fetch_code, apply=apply_code)


def handler_for_record(_record: Row) -> Handler:
    """Every Mini Program record is handled the same way."""
    return RECORD_HANDLER
