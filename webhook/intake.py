"""Turn an opened, parsed push into one committed event row (the outbox entry)."""
from __future__ import annotations

from typing import Any

from sqlalchemy import Engine

from .envelope import OpenedPush
from .events import Push
from .store import EventStatus, insert_event, utcnow


def event_row(push: Push, opened: OpenedPush) -> dict[str, Any]:
    """The column values for a new event, status pending."""
    now = utcnow()
    return {
        "dedupe_key": push.dedupe_key,
        "msg_type": push.msg_type,
        "event": push.event,
        "to_user": push.to_user,
        "openid": push.openid,
        "card_id": push.card_id,
        "code": push.code,
        "old_code": push.old_code,
        "outer_str": push.outer_str,
        "unionid": push.unionid,
        "create_time": push.create_time,
        "mode": opened.mode,
        "raw_xml": opened.xml.decode("utf-8", errors="replace"),
        "fields": push.fields,
        "status": EventStatus.PENDING.value,
        "attempts": 0,
        "received_at": now,
        "updated_at": now,
    }


def record(engine: Engine, push: Push, opened: OpenedPush) -> int | None:
    """Commit the event; its id, or None when it was already stored (a retry)."""
    with engine.begin() as conn:
        return insert_event(conn, event_row(push, opened))
