"""The outbox: committed events reach RQ exactly once, and survive Redis being down."""
from __future__ import annotations

import datetime as dt
import threading
from typing import Any

import pytest
import redis
import sqlalchemy as sa
from rq import Queue, SimpleWorker

from webhook.config import Settings
from webhook.store import events, utcnow
from workers.context import EVENTS_QUEUE, WorkerContext
from workers.dispatch import dispatch_all, dispatch_once, reap_orphans
from workers.jobs import process_events

from .pushes import make_push
from .procs import free_port


def push_n(client: Any, settings: Settings, n: int) -> None:
    for i in range(n):
        query, body = make_push(settings, UserCardCode=f"{100000000000 + i}", FromUserName=f"oUser{i}")
        assert client.post("/wechat", query_string=query, data=body).status_code == 200


def statuses(ctx: WorkerContext) -> list[str]:
    with ctx.engine.connect() as conn:
        return list(conn.execute(sa.select(events.c.status).order_by(events.c.id)).scalars())


def queued_ids(ctx: WorkerContext) -> list[int]:
    queue = Queue(ctx.queue_name(EVENTS_QUEUE), connection=ctx.redis)
    ids: list[int] = []
    for job in queue.get_jobs():
        ids.extend(job.args[0])
    return ids


def test_dispatch_moves_pending_events_into_batched_jobs(client: Any, settings: Settings, worker_ctx: WorkerContext) -> None:
    """Pending events become queued, in jobs of at most job_batch events, each event in one job."""
    push_n(client, settings, 7)
    ctx = WorkerContext(settings=settings.with_overrides(job_batch=3), engine=worker_ctx.engine, redis=worker_ctx.redis)
    assert dispatch_once(ctx) == 7
    assert statuses(ctx) == ["queued"] * 7
    ids = queued_ids(ctx)
    assert sorted(ids) == list(range(1, 8))
    assert len(Queue(ctx.queue_name(EVENTS_QUEUE), connection=ctx.redis)) == 3
    assert dispatch_once(ctx) == 0  # nothing is queued twice


def test_worker_processes_queued_events_and_a_rerun_changes_nothing(
    client: Any, settings: Settings, worker_ctx: WorkerContext
) -> None:
    """A burst worker marks every event processed; running the job again is a no-op."""
    push_n(client, settings, 4)
    dispatch_all(worker_ctx)
    queue = Queue(worker_ctx.queue_name(EVENTS_QUEUE), connection=worker_ctx.redis)
    SimpleWorker([queue], connection=worker_ctx.redis).work(burst=True)
    assert statuses(worker_ctx) == ["processed"] * 4
    with worker_ctx.engine.connect() as conn:
        attempts = list(conn.execute(sa.select(events.c.attempts)).scalars())
    assert attempts == [1] * 4
    assert process_events([1, 2, 3, 4]) == {"processed": 0, "retrying": 0, "failed": 0, "dead": 0, "skipped": 4}
    assert statuses(worker_ctx) == ["processed"] * 4


def test_redis_down_leaves_events_pending_then_sweep_queues_them(
    client: Any, settings: Settings, worker_ctx: WorkerContext
) -> None:
    """With Redis unreachable intake still acks, events stay pending, and a later sweep queues them."""
    push_n(client, settings, 3)
    down = WorkerContext(
        settings=settings, engine=worker_ctx.engine,
        redis=redis.Redis(host="127.0.0.1", port=free_port(), socket_connect_timeout=0.5, socket_timeout=0.5),
    )
    with pytest.raises(redis.RedisError):
        dispatch_once(down)
    assert statuses(worker_ctx) == ["pending"] * 3
    assert dispatch_all(worker_ctx) == 3
    assert statuses(worker_ctx) == ["queued"] * 3
    assert sorted(queued_ids(worker_ctx)) == [1, 2, 3]


def test_orphaned_queued_events_are_released(client: Any, settings: Settings, worker_ctx: WorkerContext) -> None:
    """Events marked queued whose job never reached Redis go back to pending after a while."""
    push_n(client, settings, 2)
    with worker_ctx.engine.begin() as conn:
        conn.execute(sa.update(events).values(status="queued", job_id="evt-lost", updated_at=utcnow() - dt.timedelta(minutes=5)))
    assert reap_orphans(worker_ctx) == 2
    assert statuses(worker_ctx) == ["pending"] * 2
    # A young queued event is left alone: its dispatcher may be enqueuing it right now.
    with worker_ctx.engine.begin() as conn:
        conn.execute(sa.update(events).values(status="queued", job_id="evt-young", updated_at=utcnow()))
    assert reap_orphans(worker_ctx) == 0


def test_concurrent_dispatchers_never_queue_an_event_twice(
    client: Any, settings: Settings, worker_ctx: WorkerContext
) -> None:
    """Four dispatchers racing over the same outbox: every event in exactly one job."""
    push_n(client, settings, 60)
    ctx = WorkerContext(settings=settings.with_overrides(job_batch=5, dispatch_batch=20), engine=worker_ctx.engine,
                        redis=worker_ctx.redis)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            dispatch_all(ctx)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    ids = queued_ids(ctx)
    assert sorted(ids) == list(range(1, 61))


def test_one_failing_event_fails_alone_and_keeps_its_error(
    client: Any, settings: Settings, worker_ctx: WorkerContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A handler error (in either phase) marks only its own event failed; the rest commit."""
    from workers import handlers
    from workers.batch import BatchFailedError

    def fetch(ctx: WorkerContext, row: dict[str, Any]) -> str:
        if row["code"] == "100000000001":
            raise RuntimeError("weixin said no")
        return str(row["code"])

    def apply(ctx: WorkerContext, conn: Any, row: dict[str, Any], fetched: str) -> None:
        conn.execute(sa.update(events).where(events.c.id == row["id"]).values(outer_str="touched"))
        if fetched == "100000000002":
            raise ValueError("bad row")

    monkeypatch.setitem(handlers.HANDLERS, "user_get_card", handlers.Handler(fetch=fetch, apply=apply))
    push_n(client, settings, 4)
    with pytest.raises(BatchFailedError) as raised:
        process_events([1, 2, 3, 4])
    assert set(raised.value.failed) == {2, 3}
    with worker_ctx.engine.connect() as conn:
        got = conn.execute(sa.select(events.c.status, events.c.outer_str, events.c.last_error).order_by(events.c.id)).all()
    assert [g[0] for g in got] == ["processed", "failed", "failed", "processed"]
    assert got[2][1] != "touched"  # the failed event's writes were rolled back
    assert got[0][1] == "touched" and got[3][1] == "touched"
    assert "weixin said no" in got[1][2] and "bad row" in got[2][2]
    # A later run retries only the failed ones.
    monkeypatch.setitem(handlers.HANDLERS, "user_get_card", handlers.Handler())
    assert process_events([1, 2, 3, 4])["processed"] == 2


def _attempt_outcomes(ctx: WorkerContext, event_id: int) -> list[str]:
    from webhook.store import list_attempts

    with ctx.engine.connect() as conn:
        return [a["outcome"] for a in list_attempts(conn, event_id)]


def _burst(ctx: WorkerContext) -> None:
    queue = Queue(ctx.queue_name(EVENTS_QUEUE), connection=ctx.redis)
    SimpleWorker([queue], connection=ctx.redis).work(burst=True, with_scheduler=False)


@pytest.mark.parametrize("outcome", ["recovers", "always busy", "permanent"])
def test_transient_failures_retry_through_rq_then_die_and_permanent_ones_fail_once(
    client: Any, settings: Settings, worker_ctx: WorkerContext, monkeypatch: pytest.MonkeyPatch, outcome: str
) -> None:
    """-1 busy retries (RQ retry of the same job) until it works or is dead; a permanent error fails at once."""
    from workers import handlers
    from webhook.weixin_api import TransientWeixinError, WeixinAPIError

    calls: list[int] = []

    def fetch(ctx: WorkerContext, row: dict[str, Any]) -> None:
        calls.append(row["id"])
        if outcome == "permanent":
            raise WeixinAPIError(40053, "invalid action")
        if outcome == "always busy" or len(calls) == 1:
            raise TransientWeixinError(-1, "system error")

    monkeypatch.setitem(handlers.HANDLERS, "user_get_card", handlers.Handler(fetch=fetch))
    ctx = WorkerContext(settings=settings.with_overrides(retry_intervals=(0, 0, 0)), engine=worker_ctx.engine,
                        redis=worker_ctx.redis)
    push_n(client, settings, 1)
    dispatch_all(ctx)
    _burst(ctx)
    with ctx.engine.connect() as conn:
        status, attempts, error = conn.execute(sa.select(events.c.status, events.c.attempts, events.c.last_error)).one()
    if outcome == "recovers":
        assert (status, attempts, error) == ("processed", 2, None)
        assert _attempt_outcomes(ctx, 1) == ["retrying", "processed"]
    elif outcome == "always busy":
        assert (status, attempts) == ("dead", 4) and "-1" in error
        assert _attempt_outcomes(ctx, 1) == ["retrying", "retrying", "retrying", "dead"]
    else:
        assert (status, attempts) == ("failed", 1) and "40053" in error
        assert _attempt_outcomes(ctx, 1) == ["failed"]
        assert len(calls) == 1  # RQ's retries of the job did not touch the failed event again


def test_dispatch_takes_jobs_in_turn_and_stops_at_max_jobs(
    client: Any, settings: Settings, worker_ctx: WorkerContext
) -> None:
    """With a cap on jobs, each outbox gets its turn and the rest of the backlog stays pending."""
    from webhook.cardstore import mp_records

    push_n(client, settings, 6)
    now = utcnow()
    with worker_ctx.engine.begin() as conn:
        for i in range(2):
            conn.execute(sa.insert(mp_records).values(
                dedupe_key=f"k{i}", kind="receipt", card_id="pCard", encrypt_code=f"e{i}", mp_openid="oMP",
                is_success=True, status="pending", attempts=0, created_at=now, updated_at=now,
            ))  # fmt: skip
    ctx = WorkerContext(settings=settings.with_overrides(job_batch=2), engine=worker_ctx.engine, redis=worker_ctx.redis)
    assert dispatch_once(ctx, max_jobs=2) == 4  # one job of events, one of records
    with ctx.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(mp_records).where(mp_records.c.status == "queued")).scalar_one() == 2
    assert statuses(ctx) == ["queued"] * 2 + ["pending"] * 4
    assert dispatch_once(ctx, max_jobs=0) == 0


def test_queue_room_keeps_a_few_jobs_per_worker(settings: Settings, worker_ctx: WorkerContext) -> None:
    """The dispatcher fills the events queue up to its target depth, no further, and only once it is half empty."""
    from workers.dispatch import MIN_QUEUED_JOBS, queue_room

    assert queue_room(worker_ctx) == MIN_QUEUED_JOBS
    queue = Queue(worker_ctx.queue_name(EVENTS_QUEUE), connection=worker_ctx.redis)
    for i in range(3):
        queue.enqueue("workers.jobs.process_events", [i])
    assert queue_room(worker_ctx) == MIN_QUEUED_JOBS - 3
    while queue.count <= MIN_QUEUED_JOBS // 2:
        queue.enqueue("workers.jobs.process_events", [queue.count])
    assert queue_room(worker_ctx) == 0  # more than half full: no pass for a single job
    queue.empty()
    assert queue_room(worker_ctx) == MIN_QUEUED_JOBS


def test_dispatcher_warns_once_while_the_schema_is_missing(
    tmp_path: Any, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Before `wxcoupon db upgrade`: one clear warning, not a traceback every pass."""
    import logging
    import time

    from tests.conftest import make_settings
    from webhook.store import make_engine
    from workers.dispatch import Dispatcher

    s = make_settings(tmp_path, f"sqlite:///{tmp_path / 'empty.sqlite3'}", redis_url, dispatch_interval=0.01)
    ctx = WorkerContext(settings=s, engine=make_engine(s), redis=redis.Redis.from_url(redis_url))
    caplog.set_level(logging.WARNING, logger="wxcoupon.dispatch")
    thread = Dispatcher(ctx)
    thread.start()
    time.sleep(0.5)
    thread.stop()
    thread.join(5)
    ctx.engine.dispose()
    records = [r for r in caplog.records if r.name == "wxcoupon.dispatch"]
    assert [r.getMessage() for r in records] == [
        "the database has no schema yet: run `wxcoupon db upgrade`; nothing is dispatched until then"
    ]
    assert not any(r.exc_info for r in records)
