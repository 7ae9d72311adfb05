"""Run RQ workers for wxcoupon's queues, with the outbox dispatcher beside them."""
from __future__ import annotations

import logging

from rq import Queue, SimpleWorker

from .context import API_QUEUE, EVENTS_QUEUE, WorkerContext, install
from .dispatch import Dispatcher, dispatch_all

log = logging.getLogger("wxcoupon.worker")


def queues_for(ctx: WorkerContext) -> list[Queue]:
    """The project's queues in priority order: events first, then API work."""
    return [Queue(ctx.queue_name(name), connection=ctx.redis) for name in (EVENTS_QUEUE, API_QUEUE)]


def run_worker(ctx: WorkerContext, *, burst: bool = False, dispatcher: bool = True, name: str | None = None) -> bool:
    """Work the queues until stopped (or empty with `burst`); True if it ran cleanly.

    The worker does not fork per job: jobs carry batches of events, and the
    per-job fork would cost more than the work. supervisord restarts a worker
    that dies, and the reaper returns its events to the queue.
    """
    install(ctx)
    worker = SimpleWorker(queues_for(ctx), connection=ctx.redis, name=name)
    if burst:
        # In burst mode the outbox is drained first, so the run sees every event.
        dispatch_all(ctx)
        return bool(worker.work(burst=True, logging_level="WARNING"))
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
