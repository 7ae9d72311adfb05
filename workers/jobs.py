"""RQ job functions: the wire contract. Thin, idempotent, primitive arguments."""
from __future__ import annotations

import logging

from rq import get_current_job

from webhook.store import fail_processing, finish_processing, get_event, start_processing

from . import context
from .handlers import handler_for

log = logging.getLogger("wxcoupon.jobs")


class EventsFailedError(Exception):
    """Some events of a batch failed; each is marked failed with its error."""

    def __init__(self, failed: dict[int, str]) -> None:
        self.failed = failed
        super().__init__(f"{len(failed)} event(s) failed: {sorted(failed)}")


def process_events(event_ids: list[int]) -> dict[str, int]:
    """Handle a batch of stored events; per-event status tells each outcome."""
    ctx = context.current()
    job = get_current_job()
    job_id = job.id if job is not None else None
    with ctx.engine.begin() as conn:
        started = start_processing(conn, [int(i) for i in event_ids], job_id)
    done: list[int] = []
    failed: dict[int, str] = {}
    for event_id in started:
        try:
            with ctx.engine.begin() as conn:
                row = get_event(conn, event_id)
                if row is None:
                    continue
                handler_for(row)(ctx, conn, row)
                finish_processing(conn, [event_id])
            done.append(event_id)
        except Exception as exc:  # recorded per event, then re-raised for RQ below
            failed[event_id] = f"{type(exc).__name__}: {exc}"
            log.warning("event failed", extra={"event_id": event_id, "error": type(exc).__name__})
            with ctx.engine.begin() as conn:
                fail_processing(conn, event_id, failed[event_id])
    if failed:
        raise EventsFailedError(failed)
    return {"processed": len(done), "skipped": len(event_ids) - len(started)}
