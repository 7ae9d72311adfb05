"""What happens to one stored event: the per-event-type handlers."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy.engine import Connection

from .context import WorkerContext

Handler = Callable[[WorkerContext, Connection, dict[str, Any]], None]


def acknowledge(ctx: WorkerContext, conn: Connection, event: dict[str, Any]) -> None:
    """Events that need no work beyond being stored (the default)."""


HANDLERS: dict[str, Handler] = {}


def handler_for(event: dict[str, Any]) -> Handler:
    """The handler for an event row (by its Event, else its MsgType)."""
    return HANDLERS.get(event.get("event") or event.get("msg_type") or "", acknowledge)
