"""Run RQ workers for wxcoupon's queues, with the outbox dispatcher beside them."""
from __future__ import annotations

import logging
import os
import time
from typing import Any

from rq import Queue, SimpleWorker

from webhook import metrics

from .context import API_QUEUE, EVENTS_QUEUE, WorkerContext, install
from .dispatch import Dispatcher, dispatch_all
from .reaper import Heartbeat, children_die_with_this_process

log = logging.getLogger("wxcoupon.worker")


def queues_for(ctx: WorkerContext) -> list[Queue]:
    """The project's queues in priority order: events first, then API work."""
    return [Queue(ctx.queue_name(name), connection=ctx.redis) for name in (EVENTS_QUEUE, API_QUEUE)]


class MeasuredWorker(SimpleWorker):
    """RQ's in-process worker, timing each job into the job duration metric.

    `drained` says whether its last look found every queue empty: in burst
    mode, whether it stopped because the work was done (RQ's own return value
    only says whether it ran a job, and it also stops on an unhandled error).
    """

    drained = False

    def dequeue_job_and_maintain_ttl(self, timeout: int | None, max_idle_time: int | None = None) -> Any:
        """RQ's dequeue, remembering whether it found nothing."""
        result = super().dequeue_job_and_maintain_ttl(timeout, max_idle_time)
        self.drained = result is None
        return result

    def perform_job(self, job: Any, queue: Queue, *args: Any, **kwargs: Any) -> bool:
        """Run the job as RQ does; record its duration and outcome."""
        started = time.perf_counter()
        ok = bool(super().perform_job(job, queue, *args, **kwargs))
        name = (job.func_name or "?").rsplit(".", 1)[-1]
        metrics.observe_job(name, "finished" if ok else "failed", time.perf_counter() - started)
        return ok


def run_worker(ctx: WorkerContext, *, burst: bool = False, dispatcher: bool = True, name: str | None = None) -> bool:
    """Work the queues until stopped (or empty with `burst`); True if it ran cleanly.

    With `burst`, cleanly means it stopped because the queues were empty,
    whether or not there was anything to do (a job that failed is the job's
    row statuses' business, not the worker's).

    The worker does not fork per job: jobs carry batches of events, and the
    per-job fork would cost more than the work. supervisord restarts a worker
    that dies, and the reaper returns its events to the queue.
    """
    install(ctx)
    children_die_with_this_process()  # RQ's forked scheduler must not outlive a killed worker
    worker = MeasuredWorker(queues_for(ctx), connection=ctx.redis, name=name)
    # The reaper tells a dead worker from a slow job by this key.
    heartbeat = Heartbeat(ctx, worker.name)
    heartbeat.beat()
    heartbeat.start()
    try:
        return _work(ctx, worker, burst=burst, dispatcher=dispatcher)
    finally:
        heartbeat.stop()
        metrics.mark_process_dead(os.getpid())


def _work(ctx: WorkerContext, worker: MeasuredWorker, *, burst: bool, dispatcher: bool) -> bool:
    if burst:
        # In burst mode the outbox is drained first, so the run sees every event
        # (unless this worker was told to leave the outbox to others).
        if dispatcher:
            dispatch_all(ctx)
        worker.work(burst=True, logging_level="WARNING")
        return worker.drained
    thread = Dispatcher(ctx) if dispatcher else None
    if thread is not None:
        thread.start()
    try:
        # The scheduler runs RQ's delayed retries of failed batches.
        return bool(worker.work(logging_level="INFO", with_scheduler=True))
    finally:
        if thread is not None:
            thread.stop()
            thread.join(timeout=10)
