"""The outbox dispatcher: moves committed, pending events to RQ in batches."""
from __future__ import annotations

import datetime as dt
import logging
import secrets
import threading
import time
from dataclasses import dataclass

import redis
from rq import Queue
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus

from sqlalchemy import Table

from webhook.cardstore import mp_records
from webhook.members import activations
from webhook.store import EventStatus, events, claim_pending, mark_queued, release_jobs, stale_job_ids, utcnow, writing

from .context import EVENTS_QUEUE, WorkerContext
from .reaper import reap_stuck
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
REAP_INTERVAL = 30.0


def _chunks(ids: list[int], size: int) -> list[list[int]]:
    return [ids[i : i + size] for i in range(0, len(ids), size)]


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


def dispatch_once(ctx: WorkerContext, limit: int | None = None) -> int:
    """Move up to `limit` pending rows of each outbox into RQ jobs; return how many were queued.

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
    batches: list[tuple[Outbox, str, list[int]]] = []
    with writing(ctx.engine) as conn:
        for outbox in OUTBOXES:
            candidates = claim_pending(conn, limit, outbox.table)
            for chunk in _chunks(candidates, settings.job_batch):
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

    def stop(self) -> None:
        """Ask the loop to finish its current pass and exit."""
        self.stopping.set()

    def run(self) -> None:
        """Loop: take the cluster-wide lock, dispatch what is pending, sleep."""
        lock_name = f"{self.ctx.settings.queue_prefix}:dispatch-lock"
        while not self.stopping.is_set():
            moved = 0
            try:
                lock = self.ctx.redis.lock(lock_name, timeout=LOCK_TTL, blocking=False)
                if lock.acquire():
                    try:
                        moved = dispatch_once(self.ctx)
                        if time.monotonic() >= self._next_reap:
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
            except Exception:
                log.exception("dispatcher pass failed")
            # A full batch means more may be waiting: go again at once.
            if moved < self.ctx.settings.dispatch_batch:
                self.stopping.wait(self.ctx.settings.dispatch_interval)
