"""Mini Program records: decode their codes, then join them to the card state."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import select
from sqlalchemy.engine import Connection

from webhook.cardstore import RecordKind, mp_records
from webhook.store import among, utcnow

from .context import WorkerContext
from .handlers import Handler
from .reconcile import CardChange, CardPlan, RecordMatch

Row = dict[str, Any]


def load_records(conn: Connection, ids: Sequence[int]) -> list[Row]:
    """Mini Program records by id, in id order."""
    if not ids:
        return []
    stmt = select(mp_records).where(among(conn, mp_records.c.id, ids)).order_by(mp_records.c.id)
    return [dict(r) for r in conn.execute(stmt).mappings()]


def fetch_code(ctx: WorkerContext, record: Row) -> str | None:
    """The real code behind the record's encrypted one (card/code/decrypt)."""
    if not record["is_success"]:
        return None
    if record.get("code"):
        return str(record["code"])  # decoded on an earlier attempt
    return ctx.weixin.decrypt_code(record["encrypt_code"])


def plan_code(ctx: WorkerContext, record: Row, code: str | None) -> CardPlan:
    """Record the real code and join the Mini Program holder to the card."""
    if code is None:
        return CardPlan(record=RecordMatch(record["id"], record.get("code"), record.get("decoded_at"), None))
    oa_openid = record["oa_openid"] if record["kind"] == RecordKind.ENTRY.value else None
    change = CardChange(
        str(record["card_id"]), code,
        fields={"mp_openid": record["mp_openid"], "unionid": record["unionid"], "oa_openid": oa_openid},
    )  # fmt: skip
    decoded = RecordMatch(record["id"], code, record["decoded_at"] or utcnow(), change.key)
    return CardPlan((change,), decoded)


# Decoding is a read-only call per record: a few run at once (the real Weixin takes tens of ms each).
RECORD_HANDLER = Handler(fetch=fetch_code, plan=plan_code, concurrent=True)


def handler_for_record(_record: Row) -> Handler:
    """Every Mini Program record is handled the same way."""
    return RECORD_HANDLER
