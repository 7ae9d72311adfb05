"""The admin page's reads: the event log page and the backlog.

Flask-free. The event filter, the replayable statuses and the revive statement
live in `webhook.eventfilter`, shared with the `wxcoupon replay` command.
"""
from __future__ import annotations

from typing import Any

from sqlalchemy import func, select
from sqlalchemy.engine import Connection

from webhook.eventfilter import LOG_COLUMNS, EventFilter
from webhook.store import EventStatus, events

PAGE_SIZE = 50


def event_log(conn: Connection, flt: EventFilter, before_id: int | None = None, limit: int = PAGE_SIZE) -> list[dict[str, Any]]:
    """A page of matching events, newest first, older than `before_id`."""
    stmt = flt.apply(select(*LOG_COLUMNS))
    if before_id is not None:
        stmt = stmt.where(events.c.id < before_id)
    return [dict(r) for r in conn.execute(stmt.order_by(events.c.id.desc()).limit(limit)).mappings()]


def backlog(conn: Connection) -> dict[str, int]:
    """Events in each unfinished status (cheap: the status index, no full count)."""
    open_statuses = [s.value for s in EventStatus if s != EventStatus.PROCESSED]
    stmt = select(events.c.status, func.count()).where(events.c.status.in_(open_statuses)).group_by(events.c.status)
    counts = {s: 0 for s in open_statuses}
    counts.update({str(s): int(n) for s, n in conn.execute(stmt).all()})
    return counts
