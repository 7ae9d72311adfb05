"""The outbox dispatcher: moves committed, pending events to RQ in batches."""
from __future__ import annotations

import datetime as dt
import logging
import secrets
import threading
import time
from dataclasses import dataclass

import redis
from rq import Queue, Worker
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus
from sqlalchemy import Engine, Table, inspect
from sqlalchemy.engine import Connection
from sqlalchemy.exc import SQLAlchemyError

from webhook.cardstore import mp_records
from webhook.members import activations
from webhook.store import (
    EventStatus,
    claim_pending,
    events,
    mark_queued,
    release_jobs,
    stale_job_ids,
    utcnow,
    worker_writing,
)

from .context import EVENTS_QUEUE, WorkerContext
from .reaper import lost_before, reap_stuck
from .failures import job_retry
from .recovery import schedule_recovery

log = logging.getLogger("wxcoupon.dispatch")

PROCESS_EVENTS = "workers.jobs.process_events"
PROCESS_MP_RECORDS = "workers.jobs.process_mp_records"
PROCESS_ACTIVATIONS = "workers.jobs.process_activations"
# One dispatcher at a time across all workers: concurrent ones would be safe
# (the status update decides who wins each event) but would only contend.
LOCK_TTL = 30
# A queued event whose job is missing for this long is put back to pending.
ORPHAN_AFTER = 60.0
# The worker's dispatcher keeps the events queue this deep, no deeper: enough
# jobs for every worker to go on with, while the rest of the backlog waits as
# `pending`. Moving a whole backlog at once would hold SQLite's write lock in
# back-to-back transactions while the jobs wait for it.
QUEUED_JOBS_PER_WORKER = 8
MIN_QUEUED_JOBS = 8
# The queue is topped up only once it has drained to this share of that depth,
# and then filled back, so a pass moves several jobs. Topping it up job by job
# paid a whole pass (the lock, a claim per outbox, the enqueue) for every job:
# a fifth of a busy worker's CPU went to its dispatcher.
REFILL_BELOW = 0.5
# How soon the dispatcher looks again while the queue is full or rows keep coming.
REFILL_INTERVAL = 0.02
# One warning this often while the database has no schema yet (`wxcoupon db upgrade`).
SCHEMA_WARNING_INTERVAL = 60.0


def _chunks(ids: list[int], size: int) -> list[list[int]]:
    return [ids[i : i + size] for i in range(0, len(ids), size)]


def _claim(conn: Connection, limit: int, table: Table, job_batch: int) -> list[list[int]]:
    """The oldest pending rows of `table`, at most `limit`, as the id lists of their jobs, oldest first.

    A row that was in a run which died holding it (the reaper says so in its
    last_error) goes in a job of its own: should it be what kills workers, it
    then kills only its own job, and the reaper can count its losses.
    """
    together, apart = claim_pending(conn, limit, table, lost_before(table))
    return sorted(_chunks(together, job_batch) + [[i] for i in apart], key=lambda chunk: chunk[0])


@dataclass(frozen=True)
class Outbox:
    """A table whose pending rows the dispatcher moves into jobs of `job`."""

    table: Table
    job: str
    prefix: str


# The events pushed by Weixin, and the records the Mini Program reported.
OUTBOXES = (
    Outbox(events, PROCESS_EVENTS, "evt"),
    Outbox(mp_records, PROCESS_MP_RECORDS, "mpr"),
    Outbox(activations, PROCESS_ACTIVATIONS, "act"),  # member card activation requests
)


def queue_room(ctx: WorkerContext) -> int:
    """How many more jobs the events queue should take now.

    None while it holds more than REFILL_BELOW of its target depth
    (QUEUED_JOBS_PER_WORKER per worker), else enough to fill it.
    """
    queue = Queue(ctx.queue_name(EVENTS_QUEUE), connection=ctx.redis)
    target = max(MIN_QUEUED_JOBS, QUEUED_JOBS_PER_WORKER * Worker.count(connection=ctx.redis, queue=queue))
    queued = queue.count
    if queued > target * REFILL_BELOW:
        return 0
    return target - queued


def _share(found: list[tuple[Outbox, list[list[int]]]], max_jobs: int | None) -> list[tuple[Outbox, list[int]]]:
    """The chunks to queue, taken in turn from each outbox, at most `max_jobs` of them.

    In turn, so a backlog of one kind (events) does not hold back another (activation requests).
    """
    picked: list[tuple[Outbox, list[int]]] = []
    depth = 0
    while max_jobs is None or len(picked) < max_jobs:
        layer = [(outbox, chunks[depth]) for outbox, chunks in found if depth < len(chunks)]
        if not layer:
            break
        picked.extend(layer if max_jobs is None else layer[: max_jobs - len(picked)])
        depth += 1
    return picked


def dispatch_once(ctx: WorkerContext, limit: int | None = None, max_jobs: int | None = None) -> int:
    """Move up to `limit` pending rows of each outbox, in at most `max_jobs` jobs, into RQ; return how many were queued.

    Order matters for "never lost, never queued twice": the rows are first
    marked queued under fresh job ids in one transaction (only rows still
    pending are taken, so two dispatchers never share one), then the jobs are
    enqueued in one Redis pipeline. If Redis fails, the same job ids are
    released back to pending. If the process dies in between, the reaper finds
    queued rows whose job does not exist and releases them.
    """
    settings = ctx.settings
    limit = limit or settings.dispatch_batch
    queue = Queue(ctx.queue_name(EVENTS_QUEUE), connection=ctx.redis)
    retry = job_retry(settings.retry_intervals)
    if max_jobs is not None:
        if max_jobs <= 0:
            return 0
        limit = min(limit, max_jobs * settings.job_batch)
    batches: list[tuple[Outbox, str, list[int]]] = []
    with worker_writing(ctx.engine) as conn:
        found = [(outbox, _claim(conn, limit, outbox.table, settings.job_batch)) for outbox in OUTBOXES]
        for outbox, chunk in _share(found, max_jobs):
            job_id = f"{outbox.prefix}-{secrets.token_hex(8)}"
            won = mark_queued(conn, chunk, job_id, outbox.table)
            if won:
                batches.append((outbox, job_id, won))
    if not batches:
        return 0
    try:
        datas = [
            Queue.prepare_data(
                outbox.job, args=(ids,), job_id=job_id, description=f"{outbox.table.name}: {len(ids)}", retry=retry
            )
            for outbox, job_id, ids in batches
        ]
        with ctx.redis.pipeline() as pipe:
            queue.enqueue_many(datas, pipeline=pipe)
            pipe.execute()
    except redis.RedisError:
        with ctx.engine.begin() as conn:
            for outbox in OUTBOXES:
                release_jobs(conn, [job_id for o, job_id, _ in batches if o is outbox], outbox.table)
        raise
    queued = sum(len(ids) for _, _, ids in batches)
    log.info("dispatched", extra={"rows": queued, "jobs": len(batches)})
    return queued


def reap_orphans(ctx: WorkerContext, older_than: float = ORPHAN_AFTER) -> int:
    """Release queued rows whose RQ job is gone or ended without them.

    That happens when a dispatcher died between its commit and its enqueue, or
    when Redis lost its data. Returns how many rows went back to pending.
    """
    cutoff = utcnow() - dt.timedelta(seconds=older_than)
    released = 0
    for outbox in OUTBOXES:
        with ctx.engine.connect() as conn:
            job_ids = stale_job_ids(conn, EventStatus.QUEUED, cutoff, outbox.table)
        orphaned = [job_id for job_id in job_ids if _job_is_over(ctx, job_id)]
        if orphaned:
            with ctx.engine.begin() as conn:
                count = release_jobs(conn, orphaned, outbox.table)
            log.warning("released orphaned rows", extra={"table": outbox.table.name, "rows": count})
            released += count
    return released


def _job_is_over(ctx: WorkerContext, job_id: str) -> bool:
    """True when the job no longer exists or will not run again."""
    try:
        status = Job.fetch(job_id, connection=ctx.redis).get_status(refresh=False)
    except NoSuchJobError:
        return True
    return status in (JobStatus.FAILED, JobStatus.STOPPED, JobStatus.CANCELED, JobStatus.FINISHED)


def dispatch_all(ctx: WorkerContext) -> int:
    """Dispatch until no pending event is left; return the total queued."""
    total = 0
    while True:
        moved = dispatch_once(ctx)
        total += moved
        if moved == 0:
            return total


class Dispatcher(threading.Thread):
    """A worker's background thread: dispatch pending events every interval."""

    def __init__(self, ctx: WorkerContext) -> None:
        super().__init__(name="wxcoupon-dispatcher", daemon=True)
        self.ctx = ctx
        self.stopping = threading.Event()
        self._redis_was_down = False
        self._next_reap = 0.0
        self._next_schema_warning = 0.0

    def stop(self) -> None:
        """Ask the loop to finish its current pass and exit."""
        self.stopping.set()

    def run(self) -> None:
        """Loop: take the cluster-wide lock, dispatch what is pending, sleep."""
        lock_name = f"{self.ctx.settings.queue_prefix}:dispatch-lock"
        while not self.stopping.is_set():
            moved = 0
            full = False
            try:
                # While the queue is deep enough a pass is these two reads, without the lock.
                room = queue_room(self.ctx)
                full = room == 0
                reap_due = time.monotonic() >= self._next_reap
                lock = self.ctx.redis.lock(lock_name, timeout=LOCK_TTL, blocking=False)
                if (room or reap_due) and lock.acquire():
                    try:
                        if room:
                            # Again under the lock: another worker's dispatcher may have just filled it.
                            moved = dispatch_once(self.ctx, max_jobs=queue_room(self.ctx))
                        if reap_due:
                            reap_orphans(self.ctx)
                            reap_stuck(self.ctx)  # rows held by a worker that died
                            schedule_recovery(self.ctx)
                            self._next_reap = time.monotonic() + self.ctx.settings.reap_interval
                    finally:
                        try:
                            lock.release()
                        except redis.exceptions.LockError:
                            pass
                if self._redis_was_down:
                    log.info("redis reachable again; dispatching pending events")
                    self._redis_was_down = False
            except redis.RedisError as exc:
                if not self._redis_was_down:
                    log.warning("redis unreachable; events stay pending", extra={"error": type(exc).__name__})
                    self._redis_was_down = True
            except SQLAlchemyError:
                if schema_missing(self.ctx.engine):
                    self._warn_schema_missing()
                else:
                    log.exception("dispatcher pass failed")
            except Exception:
                log.exception("dispatcher pass failed")
            # Rows moved or the queue full: more may be waiting, look again soon.
            interval = self.ctx.settings.dispatch_interval
            self.stopping.wait(min(interval, REFILL_INTERVAL) if moved or full else interval)

    def _warn_schema_missing(self) -> None:
        now = time.monotonic()
        if now >= self._next_schema_warning:
            log.warning("the database has no schema yet: run `wxcoupon db upgrade`; nothing is dispatched until then")
            self._next_schema_warning = now + SCHEMA_WARNING_INTERVAL


def schema_missing(engine: Engine) -> bool:
    """True when the database answers but has no events table (not migrated yet)."""
    try:
        with engine.connect() as conn:
            return not inspect(conn).has_table(events.name)
    except SQLAlchemyError:
        return False  # the database itself is the problem; the pass's error says how
