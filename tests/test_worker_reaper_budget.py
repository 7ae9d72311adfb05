"""A row that kills its worker: isolated from the other rows of its job, and `dead` after the loss budget."""
from __future__ import annotations

import datetime as dt
import os
import signal
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from rq import Queue, SimpleWorker

from webhook.cardstore import mp_records
from webhook.config import Settings
from webhook.eventfilter import revive_events
from webhook.store import EventStatus, event_attempts, events, utcnow
from workers import card_events, handlers
from workers.context import EVENTS_QUEUE, WorkerContext, install
from workers.dispatch import PROCESS_MP_RECORDS, dispatch_all, reap_orphans
from workers.reaper import heartbeat_key, reap_stuck
from workers.replay import EventFilter, replay, replay_ids

from . import procs
from .pushes import make_push

BUDGET = 4  # 1 + the three default retry intervals
LOST_MARK = "lost with its worker"  # how the last_error of a row taken back from a dead run begins
POISON = "300000000002"


class WorkerKilled(BaseException):
    """Stands in for the death of the worker process: the job stops where it is and writes nothing more.

    A BaseException, so that no `except Exception` of the batch catches it; RQ records the job as failed.
    """


def push(client: Any, settings: Settings, *codes: str) -> None:
    for code in codes:
        query, body = make_push(settings, "user_consume_card", UserCardCode=code, FromUserName=f"oUser{code[-2:]}")
        assert client.post("/wechat", query_string=query, data=body).status_code == 200


def poison(monkeypatch: pytest.MonkeyPatch, script: Callable[[], str] = lambda: "crash") -> list[str]:
    """Make the row with code POISON do what `script` says on each run (crash, busy, ok); the others succeed.

    Returns the list of what happened, in order.
    """
    from webhook.weixin_api import TransientWeixinError

    seen: list[str] = []

    def fetch(ctx: WorkerContext, row: dict[str, Any]) -> None:
        if row["code"] != POISON:
            return None
        what = script()
        seen.append(what)
        if what == "crash":
            raise WorkerKilled()
        if what == "busy":
            raise TransientWeixinError(-1, "system error")
        return None

    monkeypatch.setitem(handlers.HANDLERS, "user_consume_card",
                        handlers.Handler(fetch=fetch, plan=card_events.plan_user_consume_card))  # fmt: skip
    return seen


def queue_of(ctx: WorkerContext) -> Queue:
    return Queue(ctx.queue_name(EVENTS_QUEUE), connection=ctx.redis)


def queued_jobs(ctx: WorkerContext) -> list[list[int]]:
    return sorted(list(job.args[0]) for job in queue_of(ctx).get_jobs())


def work(ctx: WorkerContext) -> None:
    SimpleWorker([queue_of(ctx)], connection=ctx.redis).work(burst=True, with_scheduler=False)


def cycle(ctx: WorkerContext) -> int:
    """One turn of the crash loop: the workers run what is queued, the reaper looks, the dispatcher queues."""
    work(ctx)
    moved = reap_stuck(ctx, min_age=0)
    dispatch_all(ctx)
    return moved


def row(ctx: WorkerContext, event_id: int) -> dict[str, Any]:
    with ctx.engine.connect() as conn:
        return dict(conn.execute(sa.select(events).where(events.c.id == event_id)).mappings().one())


def statuses(ctx: WorkerContext) -> list[str]:
    with ctx.engine.connect() as conn:
        return list(conn.execute(sa.select(events.c.status).order_by(events.c.id)).scalars())


def attempts(ctx: WorkerContext, event_id: int) -> list[tuple[str, bool]]:
    """(outcome, recorded by the reaper) of each attempt at an event, oldest first."""
    with ctx.engine.connect() as conn:
        found = conn.execute(
            sa.select(event_attempts.c.outcome, event_attempts.c.worker)
            .where(event_attempts.c.event_id == event_id).order_by(event_attempts.c.id)
        ).all()  # fmt: skip
    return [(outcome, worker is None) for outcome, worker in found]


def test_rows_of_an_abandoned_job_go_back_each_in_a_job_of_its_own(
    client: Any, settings: Settings, worker_ctx: WorkerContext
) -> None:
    """The rows a lost job of three held are not batched together again: the dispatcher gives each its own job,
    while rows that were never lost still share one. They used to go out together, poison row and all."""
    push(client, settings, "300000000001", POISON, "300000000003")
    dispatch_all(worker_ctx)
    [[job_id, ids]] = [(job.id, job.args[0]) for job in queue_of(worker_ctx).get_jobs()]
    assert ids == [1, 2, 3]
    queue_of(worker_ctx).empty()  # the job is gone from Redis, its rows still processing: a lost run
    with worker_ctx.engine.begin() as conn:
        conn.execute(sa.update(events).values(status="processing", attempts=1,
                                              updated_at=utcnow() - dt.timedelta(hours=1)))  # fmt: skip
    push(client, settings, "300000000004", "300000000005")
    assert reap_stuck(worker_ctx) == 3
    assert statuses(worker_ctx) == ["pending"] * 5
    assert dispatch_all(worker_ctx) == 5
    assert queued_jobs(worker_ctx) == [[1], [2], [3], [4, 5]]
    assert row(worker_ctx, 1)["last_error"] == f"{LOST_MARK} 1 time(s) in a row (of {BUDGET} allowed): job gone"


def test_the_poison_row_kills_only_its_own_job_and_is_dead_after_the_budget(
    client: Any, settings: Settings, worker_ctx: WorkerContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A row that kills every run holding it: after the first loss the innocent rows of its job are processed
    in jobs of their own, and the poison row, lost 4 times in a row (the tries a transient failure gets), is
    `dead` with a `dead` attempt and says why; replay --status dead finds it. It used to go round for ever."""
    seen = poison(monkeypatch)
    push(client, settings, "300000000001", POISON, "300000000003")
    dispatch_all(worker_ctx)
    assert queued_jobs(worker_ctx) == [[1, 2, 3]]
    assert cycle(worker_ctx) == 3
    assert queued_jobs(worker_ctx) == [[1], [2], [3]]
    assert cycle(worker_ctx) == 1
    assert statuses(worker_ctx) == ["processed", "queued", "processed"]
    assert attempts(worker_ctx, 1) == attempts(worker_ctx, 3) == [("retrying", True), ("processed", False)]
    assert cycle(worker_ctx) == 1
    assert statuses(worker_ctx)[1] == "queued"  # lost 3 times in a row: one try left
    assert cycle(worker_ctx) == 1
    assert seen == ["crash"] * BUDGET
    dead = row(worker_ctx, 2)
    assert (dead["status"], dead["attempts"]) == ("dead", BUDGET)
    assert dead["last_error"].startswith(f"{LOST_MARK} {BUDGET} times in a row, the last time alone in its job")
    assert attempts(worker_ctx, 2) == [("retrying", True)] * (BUDGET - 1) + [("dead", True)]
    assert queued_jobs(worker_ctx) == [] and cycle(worker_ctx) == 0 and seen == ["crash"] * BUDGET
    assert replay(worker_ctx, EventFilter(statuses=("dead",)), dry_run=True).matched == 1


def test_any_other_outcome_between_losses_starts_the_count_again(
    client: Any, settings: Settings, worker_ctx: WorkerContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lost 3 times, then a run that ended normally (a transient failure, retried by RQ), then lost again: the
    row is not dead, it has 3 more tries; only 4 losses in a row make it dead."""
    ctx = WorkerContext(settings=settings.with_overrides(retry_intervals=(0, 0, 0)), engine=worker_ctx.engine,
                        redis=worker_ctx.redis)  # fmt: skip
    install(ctx)  # RQ retries at once, within the burst
    plan = iter(["crash"] * 3 + ["busy"] + ["crash"] * 4)
    seen = poison(monkeypatch, lambda: next(plan))
    push(client, settings, POISON)
    dispatch_all(ctx)
    for _ in range(3):
        assert cycle(ctx) == 1
    assert cycle(ctx) == 1  # busy, RQ's retry at once, lost
    assert seen == ["crash"] * 3 + ["busy", "crash"]
    lost = row(ctx, 1)
    assert lost["status"] == "queued"
    assert lost["last_error"].startswith(f"{LOST_MARK} 1 time(s) in a row (of {BUDGET} allowed)")
    assert attempts(ctx, 1) == [("retrying", True)] * 3 + [("retrying", False), ("retrying", True)]
    for _ in range(2):
        cycle(ctx)
    assert row(ctx, 1)["status"] == "queued"
    cycle(ctx)
    assert row(ctx, 1)["status"] == "dead" and seen == ["crash"] * 3 + ["busy"] + ["crash"] * 4


def test_a_replayed_dead_row_gets_a_fresh_budget(
    client: Any, settings: Settings, worker_ctx: WorkerContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`wxcoupon replay` of a row dead by losses queues it; lost once more it is not dead at once but counts
    from 1; when it no longer kills its worker it is processed."""
    crashing = {"on": True}
    poison(monkeypatch, lambda: "crash" if crashing["on"] else "ok")
    push(client, settings, POISON)
    dispatch_all(worker_ctx)
    for _ in range(BUDGET):
        cycle(worker_ctx)
    assert statuses(worker_ctx) == ["dead"]
    assert replay_ids(worker_ctx, [1]).queued == 1
    assert cycle(worker_ctx) == 1
    again = row(worker_ctx, 1)
    assert again["status"] == "queued" and again["last_error"].startswith(f"{LOST_MARK} 1 time(s) in a row")
    crashing["on"] = False
    work(worker_ctx)
    assert statuses(worker_ctx) == ["processed"]
    assert [o for o, _ in attempts(worker_ctx, 1)] == ["retrying"] * (BUDGET - 1) + ["dead", "retrying", "processed"]


def test_a_dead_row_revived_by_the_admin_goes_out_alone(
    client: Any, settings: Settings, worker_ctx: WorkerContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The admin's replay button puts a row dead by losses back to pending: the dispatcher gives it a job of its
    own, not a place in the backlog's next batch."""
    poison(monkeypatch)
    push(client, settings, POISON)
    dispatch_all(worker_ctx)
    for _ in range(BUDGET):
        cycle(worker_ctx)
    assert statuses(worker_ctx) == ["dead"]
    push(client, settings, "300000000003", "300000000004")
    with worker_ctx.engine.begin() as conn:
        assert revive_events(conn, [1]) == 1
    assert statuses(worker_ctx) == ["pending"] * 3
    dispatch_all(worker_ctx)
    assert queued_jobs(worker_ctx) == [[1], [2, 3]]


def _record(conn: Any, n: int, **values: Any) -> None:
    now = utcnow()
    conn.execute(sa.insert(mp_records).values(
        dedupe_key=f"rec-{n}", kind="entry", card_id="pCardRecord000000000000001", encrypt_code=f"enc{n}",
        is_success=True, attempts=1, created_at=now, **values,
    ))  # fmt: skip


def test_mini_program_records_are_isolated_and_dead_after_the_budget_too(
    settings: Settings, worker_ctx: WorkerContext
) -> None:
    """The Mini Program records share the outbox and its batches: the rows of a lost job go out alone, and a
    record lost alone for the 4th time in a row is dead (they have no attempts table; the count is in
    last_error)."""
    long_ago = utcnow() - dt.timedelta(hours=1)
    streak = f"{LOST_MARK} 3 time(s) in a row (of {BUDGET} allowed): job gone"
    with worker_ctx.engine.begin() as conn:
        for n in (1, 2):
            _record(conn, n, status="processing", job_id="mpr-lost", updated_at=long_ago)
        _record(conn, 3, status="processing", job_id="mpr-alone", last_error=streak, updated_at=long_ago)
        _record(conn, 4, status="pending", updated_at=long_ago)
        _record(conn, 5, status="pending", updated_at=long_ago)
    assert reap_stuck(worker_ctx) == 3
    with worker_ctx.engine.connect() as conn:
        got = conn.execute(sa.select(mp_records.c.status, mp_records.c.last_error).order_by(mp_records.c.id)).all()
    assert [s for s, _ in got] == ["pending", "pending", "dead", "pending", "pending"]
    assert got[2][1].startswith(f"{LOST_MARK} {BUDGET} times in a row")
    dispatch_all(worker_ctx)
    jobs = sorted(list(job.args[0]) for job in queue_of(worker_ctx).get_jobs() if job.func_name == PROCESS_MP_RECORDS)
    assert jobs == [[1], [2], [4, 5]]


def test_an_isolated_row_released_as_an_orphan_still_goes_alone(
    client: Any, settings: Settings, worker_ctx: WorkerContext
) -> None:
    """Should its single-row job never reach Redis (a dispatcher killed between its commit and its enqueue),
    the orphan reaper puts the row back to pending; the dispatcher still queues it alone."""
    push(client, settings, "300000000001", POISON)
    with worker_ctx.engine.begin() as conn:
        conn.execute(sa.update(events).values(status="processing", job_id="evt-lost", attempts=1,
                                              updated_at=utcnow() - dt.timedelta(hours=1)))  # fmt: skip
    assert reap_stuck(worker_ctx) == 2
    dispatch_all(worker_ctx)
    queue_of(worker_ctx).empty()  # the jobs are lost, the rows stay queued
    assert reap_orphans(worker_ctx, older_than=0) == 2
    assert statuses(worker_ctx) == ["pending", "pending"]
    push(client, settings, "300000000003", "300000000004")
    dispatch_all(worker_ctx)
    assert queued_jobs(worker_ctx) == [[1], [2], [3, 4]]


@pytest.fixture
def blackhole() -> Iterator[int]:
    """A loopback port that takes connections and never answers (a Weixin that hangs)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        yield int(listener.getsockname()[1])


def _wait(what: str, done: Callable[[], bool], log: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen in {timeout}s:\n{log.read_text()}")
        time.sleep(0.05)


def test_a_worker_killed_mid_job_leaves_rows_that_go_out_one_per_job(
    client: Any, settings: Settings, worker_ctx: WorkerContext, monkeypatch: pytest.MonkeyPatch,
    blackhole: int, tmp_path: Path,
) -> None:
    """A real `wxcoupon worker` takes a job of three rows and is SIGKILLed while it waits on Weixin: once its
    heartbeat has expired the reaper takes the rows back and each goes out in a job of its own, where it is
    processed."""
    from cryptography.fernet import Fernet

    for code in ("300000000001", POISON, "300000000003"):
        query, body = make_push(settings, "submit_membercard_user_info", UserCardCode=code)
        assert client.post("/wechat", query_string=query, data=body).status_code == 200
    env = procs.settings_env(settings, WECHAT_API_BASE=f"http://127.0.0.1:{blackhole}", WXCOUPON_HEARTBEAT_TTL="1",
                             WXCOUPON_DATA_KEY=Fernet.generate_key().decode())  # fmt: skip
    log = tmp_path / "worker.log"
    proc = procs.start(["worker", "--name", "w-kill"], env, log)
    try:
        _wait("the job taking its rows", lambda: statuses(worker_ctx) == ["processing"] * 3, log)
        os.killpg(proc.pid, signal.SIGKILL)  # the worker and its scheduler, as the OOM killer or supervisord would
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    name = f"w-kill.{proc.pid}"
    key = heartbeat_key(settings.queue_prefix, name)
    _wait("the heartbeat expiring", lambda: not worker_ctx.redis.exists(key), log)
    assert reap_stuck(worker_ctx, min_age=0) == 3
    assert all(name in str(row(worker_ctx, i)["last_error"]) for i in (1, 2, 3))
    dispatch_all(worker_ctx)
    assert queued_jobs(worker_ctx) == [[1], [2], [3]]
    monkeypatch.setitem(handlers.HANDLERS, "submit_membercard_user_info", handlers.Handler())  # no Weixin here
    work(worker_ctx)
    assert statuses(worker_ctx) == ["processed"] * 3
    assert attempts(worker_ctx, 2) == [("retrying", True), ("processed", False)]
