"""A job only writes the rows it still holds; the reaper only records the rows it really moved."""
from __future__ import annotations

from typing import Any

import pytest
import sqlalchemy as sa
from rq import Queue, SimpleWorker

from webhook.cardstore import cards
from webhook.config import Settings
from webhook.store import EventStatus, events, list_attempts, make_engine, worker_writing
from workers import card_events, handlers
from workers.context import EVENTS_QUEUE, WorkerContext
from workers.dispatch import dispatch_all
from workers.reaper import requeue_rows

from .pushes import make_push

CARD = "pCardHeld00000000000000001"


def _push(client: Any, settings: Settings, code: str) -> None:
    query, body = make_push(settings, CardId=CARD, UserCardCode=code)
    assert client.post("/wechat", query_string=query, data=body).status_code == 200


def _outcomes(ctx: WorkerContext, event_id: int) -> list[str]:
    with ctx.engine.connect() as conn:
        return [a["outcome"] for a in list_attempts(conn, event_id)]


@pytest.mark.parametrize("answer", ["fetched", "weixin busy"])
def test_a_job_whose_rows_the_reaper_took_back_writes_nothing_for_them(
    client: Any, settings: Settings, worker_ctx: WorkerContext, monkeypatch: pytest.MonkeyPatch, answer: str
) -> None:
    """While a job calls Weixin, the reaper takes it for lost (Redis restarted without it, or its heartbeat
    lapsed) and puts its rows back to pending: when the job, alive after all, reaches its write phase it
    applies nothing, records no attempt, finishes or fails nothing for those rows and is not retried for
    them; the next job does it once."""
    from webhook.weixin_api import TransientWeixinError

    reaped: list[int] = []

    def fetch(ctx: WorkerContext, row: dict[str, Any]) -> str:
        if not reaped:  # the first run only: the reaper acts while this job is in its Weixin calls
            with worker_writing(ctx.engine) as conn:
                reaped.extend(requeue_rows(conn, events, str(row["job_id"]), EventStatus.PROCESSING, "job gone"))
            if answer == "weixin busy":
                raise TransientWeixinError(-1, "system error")
        return str(row["code"])

    monkeypatch.setitem(handlers.HANDLERS, "user_get_card",
                        handlers.Handler(fetch=fetch, plan=card_events.plan_user_get_card))  # fmt: skip
    _push(client, settings, "300000000001")
    dispatch_all(worker_ctx)
    queue = Queue(worker_ctx.queue_name(EVENTS_QUEUE), connection=worker_ctx.redis)
    [job] = queue.get_jobs()
    SimpleWorker([queue], connection=worker_ctx.redis).work(burst=True, with_scheduler=False)
    assert reaped == [1]
    assert job.latest_result().return_value == {"processed": 0, "retrying": 0, "failed": 0, "dead": 0, "skipped": 1}
    with worker_ctx.engine.connect() as conn:
        assert conn.execute(sa.select(events.c.status, events.c.job_id)).one() == ("pending", None)
        assert conn.execute(sa.select(sa.func.count()).select_from(cards)).scalar_one() == 0
    assert _outcomes(worker_ctx, 1) == ["retrying"]  # the reaper's "job gone", and nothing from the stale job
    dispatch_all(worker_ctx)  # the outbox again: a new job processes it, once
    SimpleWorker([queue], connection=worker_ctx.redis).work(burst=True, with_scheduler=False)
    with worker_ctx.engine.connect() as conn:
        assert conn.execute(sa.select(events.c.status)).scalar_one() == "processed"
        assert conn.execute(sa.select(sa.func.count()).select_from(cards)).scalar_one() == 1
    assert _outcomes(worker_ctx, 1) == ["retrying", "processed"]


def test_the_reaper_records_only_the_rows_it_moved(client: Any, settings: Settings, worker_ctx: WorkerContext) -> None:
    """On PostgreSQL the job may finish a row between the reaper's look and its change (the job's write phase
    locks its rows first): that row is not requeued, gets no "worker lost" attempt and is not counted."""
    if worker_ctx.engine.dialect.name != "postgresql":
        pytest.skip("SQLite serializes the reaper's look and change with the job's write (BEGIN IMMEDIATE)")
    _push(client, settings, "300000000002")
    _push(client, settings, "300000000003")
    with worker_ctx.engine.begin() as conn:
        conn.execute(sa.update(events).values(status="processing", job_id="evt-lost", attempts=1))
    other = make_engine(settings)

    looks: list[str] = []

    def job_finishes_row_1(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT") and "job_id" in statement and not looks:
            looks.append(statement)
            with other.begin() as finisher:
                finisher.execute(sa.update(events).where(events.c.id == 1).values(status="processed"))

    sa.event.listen(worker_ctx.engine, "after_cursor_execute", job_finishes_row_1)
    try:
        with worker_writing(worker_ctx.engine) as conn:
            moved = requeue_rows(conn, events, "evt-lost", EventStatus.PROCESSING, "job gone")
    finally:
        sa.event.remove(worker_ctx.engine, "after_cursor_execute", job_finishes_row_1)
        other.dispose()
    assert moved == [2]
    with worker_ctx.engine.connect() as conn:
        assert list(conn.execute(sa.select(events.c.status).order_by(events.c.id)).scalars()) == ["processed", "pending"]
    assert (_outcomes(worker_ctx, 1), _outcomes(worker_ctx, 2)) == ([], ["retrying"])
