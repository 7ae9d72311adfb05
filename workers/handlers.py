"""What happens to one stored event: per-event-type handlers in two phases.

`fetch` may call Weixin and must not write the database; the second phase only
writes, inside the batch's transaction. Keeping network calls out of the
transaction keeps SQLite's single write lock short, so intake never waits
behind a worker.

A handler's second phase is either `plan`, the card changes of the row
(applied set-based with every other planned row of the batch; its `apply` then
applies them for that row alone), or only `apply`, a function that writes one
row itself (under its own savepoint).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy.engine import Connection

from . import card_events, member_info
from .context import WorkerContext
from .reconcile import NO_CHANGE, CardPlan, apply_plans

Row = dict[str, Any]


def no_fetch(ctx: WorkerContext, event: Row) -> None:
    """Nothing to ask Weixin."""
    return None


def _no_apply(ctx: WorkerContext, conn: Connection, event: Row, fetched: Any) -> None:
    return None


def _no_plan(ctx: WorkerContext, event: Row, fetched: Any) -> CardPlan:
    return NO_CHANGE


@dataclass(frozen=True)
class Handler:
    """The two phases of handling one row.

    `concurrent`: the fetch is a read-only Weixin call that may run in a small
    thread pool beside the other rows' fetches.
    """

    fetch: Callable[[WorkerContext, Row], Any] = no_fetch
    apply: Callable[[WorkerContext, Connection, Row, Any], None] = _no_apply
    plan: Callable[[WorkerContext, Row, Any], CardPlan] | None = None
    concurrent: bool = False

    def __post_init__(self) -> None:
        if self.plan is not None and self.apply is _no_apply:
            # `apply` of a planned handler applies its plan for this row alone.
            plan = self.plan

            def apply(ctx: WorkerContext, conn: Connection, row: Row, fetched: Any) -> None:
                apply_plans(conn, [plan(ctx, row, fetched)])

            object.__setattr__(self, "apply", apply)


# Events that need nothing beyond being stored (the default).
ACKNOWLEDGE = Handler(plan=_no_plan)

HANDLERS: dict[str, Handler] = {
    "user_get_card": Handler(plan=card_events.plan_user_get_card),
    "user_gifting_card": Handler(plan=card_events.plan_user_gifting_card),
    "user_del_card": Handler(plan=card_events.plan_user_del_card),
    "user_consume_card": Handler(plan=card_events.plan_user_consume_card),
    # Non-redirect activation component: read the submitted form, store it encrypted.
    "submit_membercard_user_info": Handler(
        fetch=member_info.fetch_member_info, apply=member_info.apply_member_info, concurrent=True
    ),
}


def handler_for(event: Row) -> Handler:
    """The handler for an event row (by its Event, else its MsgType)."""
    return HANDLERS.get(event.get("event") or event.get("msg_type") or "", ACKNOWLEDGE)
