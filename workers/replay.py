"""Replay: send stored events through the workers again, from the durable store.

RQ's failed-job registry expires; the `events` table does not, so a replay
selects from it. Each page of matching events is, in one transaction, moved
from failed, dead or pending to `queued` under fresh job ids (one statement
per page on PostgreSQL, one executemany on SQLite, whatever the job size), and
its jobs are then enqueued in one Redis pipeline. Interrupting it is safe at any point: a page whose jobs did not
reach Redis is released to `pending`, the outbox (on SIGKILL, the orphan
reaper does that), and pending events are dispatched by the workers anyway.
Running it again picks up what is still failed.
"""
from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from rq import Queue
from sqlalchemy import BigInteger, Text, bindparam, cast, func, literal, or_, select, update
from sqlalchemy.dialects.postgresql import ARRAY

from webhook import metrics
from webhook.eventfilter import REPLAYABLE, EventFilter, count_events, event_ids_after, revive_events
from webhook.store import EventStatus, events, release_jobs, utcnow, worker_writing

from .context import EVENTS_QUEUE, WorkerContext
from .dispatch import PROCESS_EVENTS
from .failures import job_retry
from .reaper import lost_before

__all__ = ["REPLAYABLE", "EventFilter", "ReplayResult", "replay", "replay_ids", "revive_events"]

PAGE = 1000  # events per transaction and per Redis pipeline
NO_SUCH_EVENT = "no such event"  # why an id of `replay_ids` was left: it names no event


@dataclass
class ReplayResult:
    """What a replay did (or, dry, would do)."""

    matched: int = 0
    queued: int = 0
    jobs: int = 0
    unchanged: dict[int, str] = field(default_factory=dict)  # id -> why (replay ids only)


def _chunks(ids: list[int], size: int) -> Iterator[list[int]]:
    for i in range(0, len(ids), size):
        yield ids[i : i + size]


# SQLite runs an executemany in-process, with no round trip per row: one
# UPDATE by primary key per event is its fastest way.
_MARK_ONE_QUEUED = (
    update(events)
    .where(events.c.id == bindparam("b_id"), or_(*(events.c.status == s.value for s in REPLAYABLE)))
    .values(status=EventStatus.QUEUED.value, job_id=bindparam("b_job"), updated_at=bindparam("b_now"))
)


def _unnest(plan: dict[str, list[int]]) -> Any:
    """PostgreSQL: the (event_id, job) pairs as a derived table from two array
    parameters, so the statement compiles once and runs once per page."""
    pairs = [(i, job) for job, chunk in plan.items() for i in chunk]
    ids = cast(literal([i for i, _ in pairs], ARRAY(BigInteger())), ARRAY(BigInteger()))
    jobs = cast(literal([j for _, j in pairs], ARRAY(Text())), ARRAY(Text()))
    return func.unnest(ids, jobs).table_valued("event_id", "job").render_derived(name="assignment")


def mark_page_queued(conn: Any, ids: Sequence[int], job_batch: int) -> list[tuple[str, list[int]]]:
    """Move the replayable events among `ids` to queued, `job_batch` per fresh job id; the jobs that won rows.

    Rows that changed status meanwhile (processed, or taken by a dispatcher)
    are simply not moved: the status condition decides, row by row. A row
    whose last run died holding it (dead after its losses, most often) goes
    in a job of its own, as the dispatcher does: if it kills a worker again,
    it takes no other row with it.
    """
    alone = set(conn.execute(select(events.c.id).where(events.c.id.in_(list(ids)), lost_before(events))).scalars())
    plan = {f"rpl-{secrets.token_hex(8)}": chunk for chunk in _chunks(sorted(set(ids) - alone), job_batch)}
    plan.update({f"rpl-{secrets.token_hex(8)}": [i] for i in sorted(alone)})
    if conn.dialect.name == "postgresql":
        assignment = _unnest(plan)
        moved = conn.execute(
            update(events)
            .where(events.c.id == assignment.c.event_id, events.c.status.in_([s.value for s in REPLAYABLE]))
            .values(status=EventStatus.QUEUED.value, job_id=assignment.c.job, updated_at=utcnow())
            .returning(events.c.id, events.c.job_id)
        ).all()
    else:
        now = utcnow()
        conn.execute(_MARK_ONE_QUEUED, [{"b_id": i, "b_job": job, "b_now": now} for job, chunk in plan.items() for i in chunk])
        moved = conn.execute(
            select(events.c.id, events.c.job_id).where(events.c.id.in_(list(ids)), events.c.status == EventStatus.QUEUED.value)
        ).all()
    won: dict[str, list[int]] = {}
    for event_id, job_id in moved:
        if job_id in plan:  # not a row some dispatcher queued under its own job meanwhile
            won.setdefault(str(job_id), []).append(int(event_id))
    return [(job, sorted(won[job])) for job in plan if job in won]


def queue_page(ctx: WorkerContext, ids: Sequence[int]) -> tuple[int, int]:
    """Mark one page of events queued and enqueue its jobs; return (events queued, jobs).

    The status change commits before the enqueue, so a job never runs ahead
    of its rows; if the enqueue does not complete, the rows go back to pending.
    """
    settings = ctx.settings
    with worker_writing(ctx.engine) as conn:
        batches = mark_page_queued(conn, ids, settings.job_batch)
    if not batches:
        return 0, 0
    retry = job_retry(settings.retry_intervals)
    try:
        queue = Queue(ctx.queue_name(EVENTS_QUEUE), connection=ctx.redis)
        datas = [
            Queue.prepare_data(PROCESS_EVENTS, args=(won,), job_id=job_id, description=f"replay: {len(won)}", retry=retry)
            for job_id, won in batches
        ]
        with ctx.redis.pipeline() as pipe:
            queue.enqueue_many(datas, pipeline=pipe)
            pipe.execute()
    except BaseException:  # Redis down, Ctrl-C: nothing may stay queued without a job
        # Should the jobs have reached Redis after all, they find no row queued
        # under their ids and do nothing; the released rows go out again.
        with ctx.engine.begin() as conn:
            release_jobs(conn, [job_id for job_id, _ in batches])
        raise
    queued = sum(len(won) for _, won in batches)
    metrics.count_replayed(queued)
    return queued, len(batches)


def _replayable(flt: EventFilter) -> EventFilter:
    """The filter limited to replayable statuses (all of them when it names none)."""
    allowed = {r.value for r in REPLAYABLE}
    statuses = flt.statuses or tuple(r.value for r in REPLAYABLE)
    if not set(statuses) <= allowed:
        raise ValueError(f"only {', '.join(sorted(allowed))} events can be replayed")
    return replace(flt, statuses=tuple(statuses))


def replay(
    ctx: WorkerContext,
    flt: EventFilter,
    *,
    dry_run: bool = False,
    page: int = PAGE,
    on_page: Callable[[list[dict[str, Any]]], None] | None = None,
) -> ReplayResult:
    """Replay every event matching `flt` whose status is replayable, page by page.

    Memory stays constant: pages are read by id (keyset), never all at once.
    `on_page` sees each page's rows before it is queued (progress, dry-run listing).
    """
    flt = _replayable(flt)
    result = ReplayResult()
    after = 0
    while True:
        with ctx.engine.connect() as conn:
            rows = event_ids_after(conn, flt, after, page)
        if not rows:
            return result
        after = int(rows[-1]["id"])
        result.matched += len(rows)
        if not dry_run:
            queued, jobs = queue_page(ctx, [int(r["id"]) for r in rows])
            result.queued += queued
            result.jobs += jobs
        if on_page is not None:
            on_page(rows)


def count_replayable(ctx: WorkerContext, flt: EventFilter) -> int:
    """How many events a replay with this filter would take (for the progress bar)."""
    with ctx.engine.connect() as conn:
        return count_events(conn, _replayable(flt))


def replay_ids(ctx: WorkerContext, ids: Sequence[int], *, dry_run: bool = False) -> ReplayResult:
    """Replay these events; those not replayable are listed in `unchanged` with the reason."""
    wanted = sorted(set(int(i) for i in ids))
    with ctx.engine.connect() as conn:
        found = dict(conn.execute(select(events.c.id, events.c.status).where(events.c.id.in_(wanted))).all())
    result = ReplayResult()
    allowed = {r.value for r in REPLAYABLE}
    for event_id in wanted:
        status = found.get(event_id)
        if status is None:
            result.unchanged[event_id] = NO_SUCH_EVENT
        elif status not in allowed:
            result.unchanged[event_id] = f"{status}: not replayed"
    todo = [i for i in wanted if i not in result.unchanged]
    result.matched = len(todo)
    if todo and not dry_run:
        for chunk in _chunks(todo, PAGE):
            queued, jobs = queue_page(ctx, chunk)
            result.queued += queued
            result.jobs += jobs
    return result
