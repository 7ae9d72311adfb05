"""What happens to one stored event: per-event-type handlers in two phases.

`fetch` may call Weixin and must not write the database; `apply` only writes,
inside the batch's transaction. Keeping network calls out of the transaction
keeps SQLite's single write lock short, so intake never waits behind a worker.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy.engine import Connection

from . import card_events, member_info
from .context import WorkerContext

Row = dict[str, Any]


def _no_fetch(ctx: WorkerContext, event: Row) -> None:
    return None


def _no_apply(ctx: WorkerContext, conn: Connection, event: Row, fetched: Any) -> None:
    return None


@dataclass(frozen=True)
class Handler:
    """The two phases of handling one event type."""

    fetch: Callable[[WorkerContext, Row], Any] = _no_fetch
    apply: Callable[[WorkerContext, Connection, Row, Any], None] = _no_apply


# Events that need nothing beyond being stored (the default).
ACKNOWLEDGE = Handler()

HANDLERS: dict[str, Handler] = {
    "user_get_card": Handler(apply=card_events.on_user_get_card),
    "user_gifting_card": Handler(apply=card_events.on_user_gifting_card),
    "user_del_card": Handler(apply=card_events.on_user_del_card),
    "user_consume_card": Handler(apply=card_events.on_user_consume_card),
    # Non-redirect activation component: read the submitted form, store it encrypted.
    "submit_membercard_user_info": Handler(fetch=member_info.fetch_member_info, apply=member_info.apply_member_info),
}


def handler_for(event: Row) -> Handler:
    """The handler for an event row (by its Event, else its MsgType)."""
    return HANDLERS.get(event.get("event") or event.get("msg_type") or "", ACKNOWLEDGE)
