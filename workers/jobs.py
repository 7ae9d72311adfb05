"""RQ job functions: the wire contract. Thin, idempotent, primitive arguments."""
from __future__ import annotations

import logging
from typing import Any

from rq import get_current_job

from webhook.store import fail_processing, finish_processing, get_events, start_processing, writing

from . import context
from .handlers import handler_for

log = logging.getLogger("wxcoupon.jobs")


class EventsFailedError(Exception):
    """Some events of a batch failed; each is marked failed with its error."""

    def __init__(self, failed: dict[int, str]) -> None:
        self.failed = failed
        super().__init__(f"{len(failed)} event(s) failed: {sorted(failed)}")


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:1000]


def process_events(event_ids: list[int]) -> dict[str, int]:
    """Handle a batch of stored events; each event's status tells its own outcome.

    Events already processed (a replay, a job run twice) are skipped. Network
    work happens before the write transaction; the writes of all events commit
    together, each under its own savepoint so one failure fails only its event.
    """
    ctx = context.current()
    job = get_current_job()
    job_id = job.id if job is not None else None
    with writing(ctx.engine) as conn:
        started = start_processing(conn, [int(i) for i in event_ids], job_id)
        rows = get_events(conn, started)
    failed: dict[int, str] = {}
    fetched: dict[int, Any] = {}
    for row in rows:
        try:
            fetched[row["id"]] = handler_for(row).fetch(ctx, row)
        except Exception as exc:  # recorded per event, raised for RQ below
            failed[row["id"]] = _describe(exc)
    done: list[int] = []
    with writing(ctx.engine) as conn:
        for row in rows:
            if row["id"] in failed:
                continue
            savepoint = conn.begin_nested()
            try:
                handler_for(row).apply(ctx, conn, row, fetched[row["id"]])
                savepoint.commit()
                done.append(row["id"])
            except Exception as exc:
                savepoint.rollback()
                failed[row["id"]] = _describe(exc)
        finish_processing(conn, done)
        for event_id, error in failed.items():
            fail_processing(conn, event_id, error)
    for event_id, error in failed.items():
        log.warning("event failed", extra={"event_id": event_id, "error": error.split(":")[0]})
    if failed:
        raise EventsFailedError(failed)
    return {"processed": len(done), "skipped": len(event_ids) - len(started)}
