"""Stuck work: rows left `processing` (or `queued`) by a worker that died.

A worker killed with SIGKILL, or lost with its machine, leaves its rows in
`processing` and its RQ job `started` for as long as RQ's own bookkeeping
believes in it (the job timeout plus a minute, several minutes by default).
Age alone cannot tell a dead worker from a slow job, so every worker process
keeps a short-lived heartbeat key in Redis from a thread of its own, and the
reaper asks, for each job holding rows: does the job still exist, is it still
running, and is the worker running it alive? Rows of abandoned jobs go back to
`pending` (the outbox), so the dispatcher queues them again under a new job id;
a stale copy of the old job then touches nothing, because a job only starts
rows queued under its own id.

A row whose processing kills the worker (OOM, a crash in a C extension, the
hung-worker listener's SIGKILL) would kill every worker that takes it, and
every other row of its job with it. So a row taken back from a run that died
holding it carries that in its last_error (`lost with its worker N time(s) in
a row`): the dispatcher queues each such row in a job of its own, and the
reaper counts the losses. Any other outcome (processed, failed, a retry of a
normal run) overwrites last_error and so ends the streak. A row lost as many
times in a row as a transient failure may be tried (1 + the retry intervals),
the last time alone in its job, is `dead`: only a replay revives it. A loss in
a job of several rows cannot tell which row was to blame, so it never makes a
row dead on its own; it only counts.
"""
from __future__ import annotations

import ctypes
import datetime as dt
import json
import logging
import os
import re
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis
from rq.job import Job, JobStatus
from sqlalchemy import Table, select, update
from sqlalchemy.sql.elements import ColumnElement

from webhook import metrics
from webhook.config import DEFAULT_RETRY_INTERVALS
from webhook.store import AttemptOutcome, EventStatus, add_attempts, among, events, utcnow, worker_writing

from .context import WorkerContext

log = logging.getLogger("wxcoupon.reaper")

# A job in one of these states will not finish the rows it holds.
ENDED = frozenset({JobStatus.FINISHED, JobStatus.FAILED, JobStatus.STOPPED, JobStatus.CANCELED})
# A job waiting to run again (an RQ retry of a crashed run) will not take rows
# still marked `processing`: only rows `queued` under its id start.
WAITING = frozenset({JobStatus.QUEUED, JobStatus.SCHEDULED, JobStatus.DEFERRED})
FETCH_CHUNK = 500  # jobs looked up per Redis pipeline
LOST_ERROR = "worker lost: {worker} stopped answering while it held this row"
# The last_error of a row taken back from a run that died holding it. The
# dispatcher queues a row whose last_error starts with LOST_MARK alone, and the
# reaper reads the count of the streak back from it (no column to keep it in).
LOST_MARK = "lost with its worker"
LOST_STREAK = LOST_MARK + " {count} time(s) in a row (of {budget} allowed): {reason}"
LOST_DEAD = LOST_MARK + " {count} times in a row, the last time alone in its job; dead until replayed: {reason}"
_STREAK_COUNT = re.compile(re.escape(LOST_MARK) + r" (\d+) time\(s\) in a row \(")
# While the heartbeat cannot be written (Redis down), a reminder this often; the first failure and the
# recovery are always logged.
HEARTBEAT_REMIND_SECONDS = 60.0


_PR_SET_PDEATHSIG = 1  # linux/prctl.h
_death_signal_registered = False


def children_die_with_this_process() -> None:
    """Processes forked from now on get SIGTERM when their parent dies, even by SIGKILL.

    RQ's worker forks its scheduler; without this, a worker killed with -9
    leaves that scheduler running forever, reparented to init (Linux only).
    """
    global _death_signal_registered
    if _death_signal_registered or not sys.platform.startswith("linux"):
        return
    _death_signal_registered = True
    forked_by = {"pid": 0}

    def before() -> None:
        forked_by["pid"] = os.getpid()

    def in_child() -> None:
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        except (OSError, AttributeError):
            return
        if os.getppid() != forked_by["pid"]:  # the parent died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)

    os.register_at_fork(before=before, after_in_child=in_child)


def heartbeat_key(prefix: str, worker_name: str) -> str:
    """The Redis key that says worker `worker_name` is alive."""
    return f"{prefix}:alive:{worker_name}"


def worker_alive(ctx: WorkerContext, worker_name: str | None) -> bool:
    """True while the named worker's heartbeat key exists."""
    if not worker_name:
        return False
    return bool(ctx.redis.exists(heartbeat_key(ctx.settings.queue_prefix, worker_name)))


def live_workers(ctx: WorkerContext) -> dict[str, dict[str, Any]]:
    """Every worker with a live heartbeat: name -> {host, pid, since}."""
    prefix = heartbeat_key(ctx.settings.queue_prefix, "")
    found: dict[str, dict[str, Any]] = {}
    for key in ctx.redis.scan_iter(match=f"{prefix}*", count=500):
        raw = ctx.redis.get(key)
        name = (key.decode() if isinstance(key, bytes) else str(key))[len(prefix):]
        if raw is not None:
            try:
                found[name] = json.loads(raw)
            except ValueError:
                found[name] = {}
    return found


class Heartbeat(threading.Thread):
    """Refresh this worker's heartbeat key every third of its lifetime.

    A thread of its own, so a long job does not silence it; a process that is
    killed stops it at once, and the key expires `heartbeat_ttl` seconds later.
    While Redis cannot be written the thread says so once, a reminder every
    HEARTBEAT_REMIND_SECONDS, and once more when a beat is written again: an
    outage of an hour is a handful of lines, not one per beat.
    """

    def __init__(self, ctx: WorkerContext, worker_name: str, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(name="wxcoupon-heartbeat", daemon=True)
        self.ctx = ctx
        self.key = heartbeat_key(ctx.settings.queue_prefix, worker_name)
        self.ttl_ms = max(1000, int(ctx.settings.heartbeat_ttl * 1000))
        self.value = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": utcnow().isoformat()})
        self.stopping = threading.Event()
        self._clock = clock
        self._failing_since: float | None = None  # clock() of the first failed beat of the current outage
        self._failures = 0  # failed beats in a row
        self._reminded_at = 0.0

    def beat(self) -> None:
        """Write the key once (also called before the worker takes its first job)."""
        self.ctx.redis.set(self.key, self.value, px=self.ttl_ms)

    def try_beat(self) -> bool:
        """Write the key once and log how the writing goes (never raises a Redis error); True if written."""
        try:
            self.beat()
        except redis.RedisError as exc:
            self._failed(type(exc).__name__)
            return False
        if self._failing_since is not None:
            log.info("heartbeat written again", extra={"failures": self._failures,
                                                       "seconds": round(self._clock() - self._failing_since, 1)})  # fmt: skip
            self._failing_since = None
            self._failures = 0
        return True

    def _failed(self, error: str) -> None:
        now = self._clock()
        self._failures += 1
        if self._failing_since is None:
            self._failing_since = self._reminded_at = now
            log.warning("heartbeat not written", extra={"error": error})
        elif now - self._reminded_at >= HEARTBEAT_REMIND_SECONDS:
            self._reminded_at = now
            log.warning("heartbeat still not written", extra={"error": error, "failures": self._failures,
                                                              "seconds": round(now - self._failing_since, 1)})  # fmt: skip
        else:
            log.debug("heartbeat not written", extra={"error": error})

    def stop(self) -> None:
        """Stop beating and remove the key: a clean exit is not a death."""
        self.stopping.set()
        try:
            self.ctx.redis.delete(self.key)
        except redis.RedisError:
            pass

    def run(self) -> None:
        """Beat until stopped; a Redis outage only delays the next beat."""
        while not self.stopping.wait(self.ttl_ms / 3000):
            self.try_beat()


def job_abandoned(ctx: WorkerContext, job: Job | None, row_status: str) -> str | None:
    """Why the rows a job holds (in `row_status`) will never be finished, or None if they may be.

    `job` is None when RQ no longer has it.
    """
    if job is None:
        return "job gone" if row_status == EventStatus.PROCESSING.value else None
    status = job.get_status(refresh=False)
    if status == JobStatus.STARTED:
        if worker_alive(ctx, job.worker_name):
            return None
        return LOST_ERROR.format(worker=job.worker_name or "?")
    if row_status != EventStatus.PROCESSING.value:
        # Queued rows of a missing or ended job are the orphan reaper's, after
        # its grace period (the dispatcher may be enqueuing them right now).
        return None
    if status in ENDED:
        return f"job {status.value if status else 'ended'} with the row unfinished"
    if status in WAITING:
        return "job waiting to rerun; it will not take a row still processing"
    return None


def _abandoned_jobs(
    ctx: WorkerContext, table: Table, status: EventStatus, before: dt.datetime
) -> dict[str, str]:
    with ctx.engine.connect() as conn:
        job_ids = [
            str(j)
            for j in conn.execute(
                select(table.c.job_id)
                .where(table.c.status == status.value, table.c.updated_at < before, table.c.job_id.is_not(None))
                .distinct()
            ).scalars()
        ]
    found: dict[str, str] = {}
    for start in range(0, len(job_ids), FETCH_CHUNK):
        chunk = job_ids[start : start + FETCH_CHUNK]
        # One pipeline per chunk: a backlog of queued rows can span thousands of jobs.
        for job_id, job in zip(chunk, Job.fetch_many(chunk, connection=ctx.redis)):
            reason = job_abandoned(ctx, job, status.value)
            if reason is not None:
                found[job_id] = reason
    return found


def loss_budget(retry_intervals: Sequence[int]) -> int:
    """How many times in a row a row may be lost with its worker: the tries a transient failure gets."""
    return 1 + len(retry_intervals)


def losses_in_a_row(last_error: str | None) -> int:
    """How many runs in a row died holding the row, read from its last_error (0 after any other outcome)."""
    found = _STREAK_COUNT.match(last_error or "")
    return int(found.group(1)) if found else 0


def lost_before(table: Table) -> ColumnElement[bool]:
    """Rows whose last word is that a run died holding them: each goes in a job of its own."""
    return table.c.last_error.startswith(LOST_MARK, autoescape=True)


@dataclass
class TakenBack:
    """The rows the reaper took from one job: back to the outbox, or dead."""

    pending: list[int] = field(default_factory=list)
    dead: list[int] = field(default_factory=list)

    @property
    def moved(self) -> list[int]:
        """Every row taken, in id order."""
        return sorted(self.pending + self.dead)


def _plan(row: Any, status: EventStatus, reason: str, budget: int, alone: bool) -> tuple[EventStatus, str]:
    """Where one taken row goes, and its last_error."""
    if status != EventStatus.PROCESSING:
        # Never started by the lost run: no loss to count, but a streak it had stands.
        return EventStatus.PENDING, row.last_error if str(row.last_error or "").startswith(LOST_MARK) else reason
    count = losses_in_a_row(row.last_error) + 1
    if count >= budget and alone:
        return EventStatus.DEAD, LOST_DEAD.format(count=count, reason=reason)
    return EventStatus.PENDING, LOST_STREAK.format(count=count, budget=budget, reason=reason)


def take_back(conn: Any, table: Table, job_id: str, status: EventStatus, reason: str, budget: int) -> TakenBack:
    """Take the rows `job_id` holds in `status` back to pending, or dead; record their attempts if events.

    A `processing` row was being worked on when its run died: its loss counts
    (see the module's docstring), and the next run gives it a job of its own.
    Only the rows the UPDATEs themselves moved count: on PostgreSQL the job
    may finish some of them between the look and the change (its write phase
    locks them first), and those are neither taken nor given an attempt.
    """
    held = (table.c.job_id == job_id, table.c.status == status.value)
    looked = conn.execute(
        select(table.c.id, table.c.attempts, table.c.updated_at, table.c.last_error).where(*held)
    ).all()
    taken = TakenBack()
    if not looked:
        return taken
    plans: dict[tuple[EventStatus, str], list[Any]] = {}
    for row in looked:
        plans.setdefault(_plan(row, status, reason, budget, alone=len(looked) == 1), []).append(row)
    now = utcnow()
    attempts: list[dict[str, Any]] = []
    for (to, text), rows in plans.items():
        values: dict[str, Any] = {"status": to.value, "last_error": text[:1000], "updated_at": now}
        if to == EventStatus.PENDING:
            values["job_id"] = None
        change = update(table).where(among(conn, table.c.id, [int(r.id) for r in rows]), *held).values(**values)
        if conn.dialect.update_returning:
            moved = {int(i) for i in conn.execute(change.returning(table.c.id)).scalars()}
        else:  # SQLite before 3.35: the worker's write lock (BEGIN IMMEDIATE) keeps the look and the change together
            conn.execute(change)
            moved = {int(r.id) for r in rows}
        (taken.dead if to == EventStatus.DEAD else taken.pending).extend(sorted(moved))
        if table is events and status == EventStatus.PROCESSING:
            outcome = AttemptOutcome.DEAD if to == EventStatus.DEAD else AttemptOutcome.RETRYING
            attempts.extend(
                {
                    "event_id": int(r.id),
                    "attempt": int(r.attempts),
                    "job_id": job_id,
                    "worker": None,
                    "started_at": r.updated_at or now,
                    "finished_at": now,
                    "outcome": outcome.value,
                    "error": text[:1000],
                }
                for r in rows
                if int(r.id) in moved
            )
    attempts.sort(key=lambda a: int(a["event_id"]))
    add_attempts(conn, attempts)
    return taken


def requeue_rows(
    conn: Any, table: Table, job_id: str, status: EventStatus, reason: str, budget: int | None = None
) -> list[int]:
    """`take_back`, returning the ids of every row taken (budget: that of the default retry intervals)."""
    if budget is None:
        budget = loss_budget(DEFAULT_RETRY_INTERVALS)
    return take_back(conn, table, job_id, status, reason, budget).moved


def reap_stuck(ctx: WorkerContext, tables: Sequence[Table] | None = None, min_age: float | None = None) -> int:
    """Return rows held by dead workers or dead jobs to the outbox; how many moved.

    Rows younger than `min_age` seconds (default: the heartbeat lifetime) are
    left alone: their worker has not had time to be missed.
    """
    if tables is None:
        from .dispatch import OUTBOXES

        tables = [outbox.table for outbox in OUTBOXES]
    age = ctx.settings.heartbeat_ttl if min_age is None else min_age
    before = utcnow() - dt.timedelta(seconds=age)
    budget = loss_budget(ctx.settings.retry_intervals)
    moved = 0
    for table in tables:
        for status in (EventStatus.PROCESSING, EventStatus.QUEUED):
            for job_id, reason in _abandoned_jobs(ctx, table, status, before).items():
                with worker_writing(ctx.engine) as conn:
                    taken = take_back(conn, table, job_id, status, reason, budget)
                ids = taken.moved
                if ids:
                    moved += len(ids)
                    metrics.count_reaped(table.name, len(ids))
                    log.warning(
                        "requeued stuck rows",
                        extra={"table": table.name, "rows": len(ids), "dead": len(taken.dead), "job_id": job_id,
                               "reason": reason},
                    )  # fmt: skip
    return moved
