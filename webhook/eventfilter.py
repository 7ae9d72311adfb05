"""Which events: the filter shared by the admin page and the `wxcoupon replay` command.

Flask-free and admin-free, so worker-side tools (workers.replay) use the same
filter, the same replayable statuses and the same revive statement as the
admin page without importing the admin package.
"""
from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Select, func, or_, select, update
from sqlalchemy.engine import Connection

from webhook.store import EventStatus, events, utcnow

# The statuses a replay takes back to the outbox. `processed` is final (a
# replay changes nothing); `queued` and `processing` are in flight, and the
# reaper, not a replay, handles those whose worker died.
REPLAYABLE = (EventStatus.FAILED, EventStatus.DEAD, EventStatus.PENDING)
# The columns of one line of the event log.
LOG_COLUMNS = (
    events.c.id, events.c.event, events.c.msg_type, events.c.status, events.c.attempts,
    events.c.card_id, events.c.code, events.c.outer_str, events.c.received_at, events.c.last_error,
)  # fmt: skip


def revive_events(conn: Connection, ids: Sequence[int]) -> int:
    """Put failed, dead or pending events among `ids` back to pending; return how many matched.

    Pending is the outbox: the dispatcher queues them under new job ids. Other
    statuses are left exactly as they are, so replaying a processed event
    changes nothing.
    """
    if not ids:
        return 0
    result = conn.execute(
        update(events)
        .where(events.c.id.in_(list(ids)), events.c.status.in_([s.value for s in REPLAYABLE]))
        .values(status=EventStatus.PENDING.value, job_id=None, updated_at=utcnow())
    )
    return int(result.rowcount or 0)


@dataclass(frozen=True)
class EventFilter:
    """Which events: every field optional; `search` matches id, card, code, OuterStr or openid exactly."""

    statuses: tuple[str, ...] = ()
    event: str | None = None
    card_id: str | None = None
    since: dt.datetime | None = None
    until: dt.datetime | None = None
    search: str | None = None
    ids: tuple[int, ...] = ()

    def apply(self, stmt: Select[Any]) -> Select[Any]:
        """Add this filter's conditions to a SELECT over `events`."""
        if self.ids:
            stmt = stmt.where(events.c.id.in_(self.ids))
        if self.statuses:
            stmt = stmt.where(events.c.status.in_(self.statuses))
        if self.event:
            stmt = stmt.where(or_(events.c.event == self.event, events.c.msg_type == self.event))
        if self.card_id:
            stmt = stmt.where(events.c.card_id == self.card_id)
        if self.since is not None:
            stmt = stmt.where(events.c.received_at >= self.since)
        if self.until is not None:
            stmt = stmt.where(events.c.received_at < self.until)
        term = (self.search or "").strip()
        if term:
            matches = [
                events.c.card_id == term,
                events.c.code == term,
                events.c.old_code == term,
                events.c.outer_str == term,
                events.c.openid == term,
                events.c.unionid == term,
            ]
            if term.isdigit() and len(term) <= 18:
                matches.append(events.c.id == int(term))
            stmt = stmt.where(or_(*matches))
        return stmt


def count_events(conn: Connection, flt: EventFilter) -> int:
    """How many events match."""
    return int(conn.execute(flt.apply(select(func.count()).select_from(events))).scalar_one())


def event_ids_after(conn: Connection, flt: EventFilter, after_id: int, limit: int) -> list[dict[str, Any]]:
    """The next `limit` matching events by id after `after_id` (keyset paging, oldest first)."""
    stmt = flt.apply(select(*LOG_COLUMNS)).where(events.c.id > after_id).order_by(events.c.id).limit(limit)
    return [dict(r) for r in conn.execute(stmt).mappings()]
