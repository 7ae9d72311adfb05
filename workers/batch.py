"""Run one batch job over stored rows with exact per-row status and retries."""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rq import get_current_job
from sqlalchemy import Table

from webhook.store import (
    AttemptOutcome,
    EventStatus,
    add_attempts,
    fail_processing,
    finish_processing,
    start_processing,
    utcnow,
    writing,
)

from .context import WorkerContext
from .failures import describe, is_transient
from .handlers import Handler, Row

log = logging.getLogger("wxcoupon.jobs")


class BatchFailedError(Exception):
    """Some rows of a batch failed; each row's status and error say how."""

    def __init__(self, failed: dict[int, str]) -> None:
        self.failed = failed
        super().__init__(f"{len(failed)} row(s) failed: {sorted(failed)[:20]}")


@dataclass
class BatchResult:
    """What one run of a batch did, row by row."""

    processed: list[int] = field(default_factory=list)
    retrying: dict[int, str] = field(default_factory=dict)
    failed: dict[int, str] = field(default_factory=dict)
    dead: dict[int, str] = field(default_factory=dict)
    skipped: int = 0

    def summary(self) -> dict[str, int]:
        """Counts for the RQ job result."""
        return {
            "processed": len(self.processed),
            "retrying": len(self.retrying),
            "failed": len(self.failed),
            "dead": len(self.dead),
            "skipped": self.skipped,
        }


def run_batch(
    ctx: WorkerContext,
    table: Table,
    ids: list[int],
    load: Callable[[Any, list[int]], list[Row]],
    handler_for: Callable[[Row], Handler],
    record_attempts: bool = False,
) -> BatchResult:
    """Process rows `ids` of `table`; raise BatchFailedError if any failed.

    Phase 1 (fetch) may call Weixin and holds no database transaction. Phase 2
    (apply) writes every row in one short transaction, each under its own
    savepoint, together with the status changes, so a row is `processed`
    exactly when its effects are committed. Transient failures go back to
    `queued` for RQ's retry of this job (or `dead` on the last try); permanent
    ones become `failed` and wait for a replay.
    """
    job = get_current_job()
    job_id = job.id if job is not None else None
    last_try = job is None or not job.retries_left
    worker = job.worker_name if job is not None else None
    started_at = utcnow()
    with writing(ctx.engine) as conn:
        started = start_processing(conn, [int(i) for i in ids], job_id, table)
        rows = load(conn, started)
    result = BatchResult(skipped=len(ids) - len(started))
    errors: dict[int, BaseException] = {}
    fetched: dict[int, Any] = {}
    for row in rows:
        try:
            fetched[row["id"]] = handler_for(row).fetch(ctx, row)
        except Exception as exc:
            errors[row["id"]] = exc
    with writing(ctx.engine) as conn:
        for row in rows:
            if row["id"] in errors:
                continue
            savepoint = conn.begin_nested()
            try:
                handler_for(row).apply(ctx, conn, row, fetched[row["id"]])
                savepoint.commit()
                result.processed.append(row["id"])
            except Exception as exc:
                savepoint.rollback()
                errors[row["id"]] = exc
        finish_processing(conn, result.processed, table)
        for row_id, error in errors.items():
            text = describe(error)
            if not is_transient(error):
                result.failed[row_id] = text
                status = EventStatus.FAILED
            elif last_try:
                result.dead[row_id] = text
                status = EventStatus.DEAD
            else:
                result.retrying[row_id] = text
                status = EventStatus.QUEUED  # same job id: RQ's retry takes it again
            fail_processing(conn, row_id, text, status, table)
        if record_attempts and rows:
            finished_at = utcnow()
            outcome = {
                **{i: (AttemptOutcome.PROCESSED, None) for i in result.processed},
                **{i: (AttemptOutcome.RETRYING, e) for i, e in result.retrying.items()},
                **{i: (AttemptOutcome.FAILED, e) for i, e in result.failed.items()},
                **{i: (AttemptOutcome.DEAD, e) for i, e in result.dead.items()},
            }
            add_attempts(
                conn,
                [
                    {
                        "event_id": row["id"],
                        "attempt": int(row["attempts"]),
                        "job_id": job_id,
                        "worker": worker,
                        "started_at": started_at,
                        "finished_at": finished_at,
                        "outcome": outcome[row["id"]][0].value,
                        "error": outcome[row["id"]][1],
                    }
                    for row in rows
                ],
            )
    failed = {**result.retrying, **result.failed, **result.dead}
    for row_id, text in failed.items():
        log.warning("row failed", extra={"table": table.name, "row_id": row_id, "error": text.split(":")[0]})
    if failed:
        raise BatchFailedError(failed)
    return result
