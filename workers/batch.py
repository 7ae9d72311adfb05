"""Run one batch job over stored rows with exact per-row status and retries."""
from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from rq import get_current_job
from sqlalchemy import Table, select
from sqlalchemy.engine import Connection
from sqlalchemy.exc import OperationalError

from webhook.store import (
    AttemptOutcome,
    EventStatus,
    abandon_processing,
    add_attempts,
    among,
    fail_processing,
    finish_processing,
    start_processing,
    start_rows,
    utcnow,
    worker_writing,
)

from webhook.weixin_api import ERRCODE_NETWORK, TransientWeixinError

from .context import WorkerContext
from .failures import describe, is_row_error, is_transient, loggable
from .handlers import Handler, Row, no_fetch
from .reconcile import CardPlan, apply_plans, count_outcomes

log = logging.getLogger("wxcoupon.jobs")

# Weixin calls of one batch that may run at once (read-only ones: decoding codes, reading cards).
FETCH_THREADS = 4
# A batch stops calling Weixin after this many transient failures in a row, each
# already retried by the client: the rows not yet fetched fail as transient without
# a call and go back to RQ's retry, with its backoff. Without it a job of a few
# hundred rows would spend every call's timeouts and retries on a Weixin that is
# down, for minutes, past RQ's job timeout.
FAILING_STREAK = 2 * FETCH_THREADS
# Tries of the write phase when the database refuses it for a moment (locked, deadlock),
# and the pauses between them: the Weixin answers are in hand, asking again would be waste.
WRITE_TRIES = 3
WRITE_BACKOFF = (0.2, 1.0)


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
    outcomes: Counter[str] = field(default_factory=Counter)  # reconciliation outcomes, for the metrics

    def summary(self) -> dict[str, int]:
        """Counts for the RQ job result."""
        return {
            "processed": len(self.processed),
            "retrying": len(self.retrying),
            "failed": len(self.failed),
            "dead": len(self.dead),
            "skipped": self.skipped,
        }


@dataclass
class _Run:
    """One run of a batch: who runs it, and what its rows fetched."""

    ctx: WorkerContext
    table: Table
    handler_for: Callable[[Row], Handler]
    job_id: str | None
    worker: str | None
    last_try: bool
    record_attempts: bool
    started_at: Any = field(default_factory=utcnow)
    fetched: dict[int, Any] = field(default_factory=dict)
    errors: dict[int, BaseException] = field(default_factory=dict)
    lost: set[int] = field(default_factory=set)  # rows taken back from this run during its Weixin calls


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
    (apply) writes every row in one short transaction together with the status
    changes, so a row is `processed` exactly when its effects are committed.
    The card changes of all rows are applied set-based; if that fails, each row
    is applied again alone under a savepoint, so one bad row fails alone. When
    no row needs Weixin, both phases share one transaction. Transient failures
    go back to `queued` for RQ's retry of this job (or `dead` on the last try);
    permanent ones become `failed` and wait for a replay.

    `load(conn, ids)` reads rows by id; it is only needed where the database
    cannot return the rows an UPDATE moved.
    """
    job = get_current_job()
    run = _Run(
        ctx, table, handler_for, job_id=job.id if job is not None else None,
        worker=job.worker_name if job is not None else None,
        last_try=job is None or not job.retries_left, record_attempts=record_attempts,
    )  # fmt: skip
    wanted = [int(i) for i in ids]
    rows, result = _start(run, wanted, load)
    if result is None:
        _fetch(run, rows)
        result = _write_with_retries(run, rows)
    count_outcomes(result.outcomes)  # committed: now they count
    result.skipped = len(wanted) - len(rows) + len(run.lost)
    failed = {**result.retrying, **result.failed, **result.dead}
    for row_id, text in failed.items():
        log.warning("row failed", extra={"table": table.name, "row_id": row_id, "error": text.split(":")[0]})
    if failed:
        raise BatchFailedError(failed)
    return result


def _start(run: _Run, ids: list[int], load: Callable[[Any, list[int]], list[Row]]) -> tuple[list[Row], BatchResult | None]:
    """Mark the rows processing and read them; when none needs Weixin, write them in the same transaction.

    Nothing is committed unless all of it is, so a refused transaction is simply tried again.
    """
    row_by_row = False
    attempt = 0
    while True:
        try:
            with worker_writing(run.ctx.engine) as conn:
                rows = start_rows(conn, ids, run.job_id, run.table)
                if rows is None:
                    rows = load(conn, start_processing(conn, ids, run.job_id, run.table))
                if any(run.handler_for(row).fetch is not no_fetch for row in rows):
                    return rows, None
                return rows, _write(run, conn, rows, row_by_row)  # nothing to ask Weixin: one transaction
        except _SetBasedFailed:
            row_by_row = True  # rolled back: the same transaction again, each row under a savepoint
        except OperationalError as exc:
            attempt += 1
            if attempt >= WRITE_TRIES:
                raise
            _pause(run, attempt - 1, exc)


def _pause(run: _Run, attempt: int, exc: BaseException) -> None:
    log.warning("database refused the transaction; trying again",
                extra={"table": run.table.name, "error": loggable(exc)})  # fmt: skip
    time.sleep(WRITE_BACKOFF[min(attempt, len(WRITE_BACKOFF) - 1)])


def _fetch(run: _Run, rows: list[Row]) -> None:
    """Phase 1: each row's Weixin calls, a few at a time where the handler allows it."""
    concurrent = [row for row in rows if run.handler_for(row).concurrent]
    serial = [row for row in rows if not run.handler_for(row).concurrent]
    streak = _Streak()

    def fetch(row: Row) -> None:
        if streak.broken:
            run.errors[row["id"]] = WeixinFailingError(
                ERRCODE_NETWORK, f"not called: {FAILING_STREAK} calls of this job failed in a row", "")
            return
        try:
            run.fetched[row["id"]] = run.handler_for(row).fetch(run.ctx, row)
        except Exception as exc:
            run.errors[row["id"]] = exc
            streak.failed(is_transient(exc))
        else:
            streak.succeeded()

    if len(concurrent) > 1:
        try:
            run.ctx.weixin  # noqa: B018 - the shared client, made once before the threads
        except Exception:
            pass  # each row's fetch meets the same error and keeps it
        with ThreadPoolExecutor(max_workers=min(FETCH_THREADS, len(concurrent)), thread_name_prefix="wxfetch") as pool:
            list(pool.map(fetch, concurrent))
    else:
        serial = concurrent + serial
    for row in serial:
        fetch(row)


class WeixinFailingError(TransientWeixinError):
    """A row's Weixin call was not made: the calls before it in the job kept failing."""


class _Streak:
    """Transient failures in a row among a batch's fetches (threads share it)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._count = 0
        self.broken = False

    def failed(self, transient: bool) -> None:
        with self._lock:
            self._count = self._count + 1 if transient else 0
            if self._count >= FAILING_STREAK and not self.broken:
                self.broken = True
                log.warning("weixin calls keep failing; the rest of the batch waits for RQ's retry",
                            extra={"failures": self._count})  # fmt: skip

    def succeeded(self) -> None:
        with self._lock:
            self._count = 0


def _write_with_retries(run: _Run, rows: list[Row]) -> BatchResult:
    """Phase 2 after the Weixin calls: retried a few times, and never leaves the rows stranded.

    If the database keeps refusing, the rows go back to `queued` (or `dead`) in
    a short transaction of their own, so RQ's retry of this job takes them
    again instead of the reaper, much later.
    """
    row_by_row = False
    attempt = 0
    while True:
        try:
            with worker_writing(run.ctx.engine) as conn:
                return _write(run, conn, _still_held(run, conn, rows), row_by_row)
        except _SetBasedFailed:
            row_by_row = True
        except OperationalError as exc:
            attempt += 1
            if attempt < WRITE_TRIES:
                _pause(run, attempt - 1, exc)
                continue
            _give_back(run, rows, exc)
            raise
        except Exception as exc:
            _give_back(run, rows, exc)
            raise


def _still_held(run: _Run, conn: Connection, rows: list[Row]) -> list[Row]:
    """The rows this run still holds (processing under its job), locked for its write phase.

    Between the start and the write phase, with no transaction open, the reaper
    may have taken the job for lost (Redis restarted without it, or the
    worker's heartbeat lapsed) and put its rows back to the outbox. A run that
    was alive after all must then leave those rows, their effects, attempts
    and outcomes, to the job that has them now.
    """
    if not rows:
        return rows
    table = run.table
    owner = table.c.job_id == run.job_id if run.job_id is not None else table.c.job_id.is_(None)
    stmt = (
        select(table.c.id)
        .where(among(conn, table.c.id, [r["id"] for r in rows]), table.c.status == EventStatus.PROCESSING.value, owner)
        .order_by(table.c.id)
    )
    if conn.dialect.name == "postgresql":
        stmt = stmt.with_for_update()  # the reaper waits for this transaction; SQLite's write lock is held already
    held = {int(i) for i in conn.execute(stmt).scalars()}
    run.lost = {int(r["id"]) for r in rows} - held
    if run.lost:
        log.warning("rows taken back while this job ran; left to the job that holds them now",
                    extra={"table": table.name, "rows": len(run.lost)})  # fmt: skip
    return [r for r in rows if int(r["id"]) in held]


def _give_back(run: _Run, rows: list[Row], error: BaseException) -> None:
    """Best effort: the rows of a write phase that failed, from processing back to queued (dead on the last try).

    The whole transaction failed, not one row: RQ's retry of the job tries them all again.
    """
    text = describe(error)
    if run.last_try:
        status, outcome = EventStatus.DEAD, AttemptOutcome.DEAD
    else:
        status, outcome = EventStatus.QUEUED, AttemptOutcome.RETRYING
    try:
        with worker_writing(run.ctx.engine) as conn:
            moved = abandon_processing(conn, [r["id"] for r in rows], run.job_id, text, status, run.table)
            if run.record_attempts and moved:
                now = utcnow()
                add_attempts(conn, [_attempt(run, row_id, attempts, outcome, text, now) for row_id, attempts in moved])
    except Exception as exc:
        log.error("rows of a failed write phase not given back; the reaper will",
                  extra={"table": run.table.name, "error": loggable(exc)})  # fmt: skip
        return
    log.warning("write phase failed; rows given back", extra={"table": run.table.name, "rows": len(moved),
                                                               "status": status.value})  # fmt: skip


def _attempt(run: _Run, row_id: int, attempts: int, outcome: AttemptOutcome, error: str | None, now: Any) -> dict[str, Any]:
    return {
        "event_id": row_id, "attempt": attempts, "job_id": run.job_id, "worker": run.worker,
        "started_at": run.started_at, "finished_at": now, "outcome": outcome.value, "error": error,
    }  # fmt: skip


class _SetBasedFailed(Exception):
    """The set-based apply of a batch failed: roll back, then apply its rows one by one."""


def _write(run: _Run, conn: Connection, rows: list[Row], row_by_row: bool = False) -> BatchResult:
    """Phase 2 in the caller's transaction: the rows' effects, then their status and attempts.

    The planned rows are applied set-based, without a savepoint; if that fails
    the caller rolls the transaction back and calls again `row_by_row`, where
    each row has a savepoint and fails alone.
    """
    result = BatchResult()
    ids = {row["id"] for row in rows}
    errors = {row_id: exc for row_id, exc in run.errors.items() if row_id in ids}
    planned: list[tuple[Row, Handler, CardPlan]] = []
    one_by_one: list[Row] = []
    for row in rows:
        if row["id"] in errors:
            continue
        handler = run.handler_for(row)
        if handler.plan is None:
            one_by_one.append(row)
            continue
        try:
            planned.append((row, handler, handler.plan(run.ctx, row, run.fetched.get(row["id"]))))
        except Exception as exc:
            errors[row["id"]] = exc
    if planned and not row_by_row:
        try:
            result.outcomes.update(apply_plans(conn, [plan for _, _, plan in planned]))
        except Exception as exc:
            if isinstance(exc, OperationalError) and not is_row_error(exc):
                raise  # the database, not a row: the whole write phase is tried again
            log.warning("set-based apply failed; applying row by row",
                        extra={"table": run.table.name, "error": loggable(exc)})  # fmt: skip
            raise _SetBasedFailed() from exc
        result.processed.extend(row["id"] for row, _, _ in planned)
    elif planned:
        one_by_one.extend(row for row, _, _ in planned)
        one_by_one.sort(key=lambda r: int(r["id"]))
    for row in one_by_one:
        savepoint = conn.begin_nested()
        try:
            handler = run.handler_for(row)
            if handler.plan is None:
                handler.apply(run.ctx, conn, row, run.fetched.get(row["id"]))
            else:
                result.outcomes.update(apply_plans(conn, [handler.plan(run.ctx, row, run.fetched.get(row["id"]))]))
            savepoint.commit()
            result.processed.append(row["id"])
        except Exception as exc:
            if isinstance(exc, OperationalError) and not is_row_error(exc):
                raise
            savepoint.rollback()
            errors[row["id"]] = exc
    result.processed.sort()
    finish_processing(conn, result.processed, run.table, job_id=run.job_id)
    for row_id, error in sorted(errors.items()):
        text = describe(error)
        if not is_transient(error):
            result.failed[row_id] = text
            status = EventStatus.FAILED
        elif run.last_try:
            result.dead[row_id] = text
            status = EventStatus.DEAD
        else:
            result.retrying[row_id] = text
            status = EventStatus.QUEUED  # same job id: RQ's retry takes it again
        fail_processing(conn, row_id, text, status, run.table, job_id=run.job_id)
    if run.record_attempts and rows:
        now = utcnow()
        outcome = {
            **{i: (AttemptOutcome.PROCESSED, None) for i in result.processed},
            **{i: (AttemptOutcome.RETRYING, e) for i, e in result.retrying.items()},
            **{i: (AttemptOutcome.FAILED, e) for i, e in result.failed.items()},
            **{i: (AttemptOutcome.DEAD, e) for i, e in result.dead.items()},
        }
        add_attempts(conn, [_attempt(run, r["id"], int(r["attempts"]), *outcome[r["id"]], now) for r in rows])
    return result
