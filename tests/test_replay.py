"""Replay, `events show`, and the reaper of work held by dead workers."""
from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from rq import Queue, SimpleWorker
from rq.job import Job, JobStatus

from webhook.config import Settings
from webhook.store import event_attempts, events, utcnow
from workers import handlers
from workers.cli import main
from workers.context import EVENTS_QUEUE, WorkerContext
from workers.dispatch import PROCESS_EVENTS
from workers.reaper import LOST_DEAD, Heartbeat, heartbeat_key, live_workers, reap_stuck
from workers.replay import EventFilter, replay, replay_ids

from . import procs
from .pushes import make_push


def push_n(client: Any, settings: Settings, n: int, **fields: Any) -> None:
    for i in range(n):
        query, body = make_push(
            settings, "user_consume_card", UserCardCode=f"{300000000000 + i}", FromUserName=f"oUser{i}", **fields
        )
        assert client.post("/wechat", query_string=query, data=body).status_code == 200


def set_status(ctx: WorkerContext, status: str, *ids: int, **values: Any) -> None:
    with ctx.engine.begin() as conn:
        conn.execute(sa.update(events).where(events.c.id.in_(ids)).values(status=status, **values))


def rows(ctx: WorkerContext) -> dict[int, dict[str, Any]]:
    with ctx.engine.connect() as conn:
        return {r["id"]: dict(r) for r in conn.execute(sa.select(events).order_by(events.c.id)).mappings()}


def statuses(ctx: WorkerContext) -> list[str]:
    return [r["status"] for r in rows(ctx).values()]


def queued_jobs(ctx: WorkerContext) -> dict[str, list[int]]:
    queue = Queue(ctx.queue_name(EVENTS_QUEUE), connection=ctx.redis)
    return {job.id: list(job.args[0]) for job in queue.get_jobs()}


def work(ctx: WorkerContext) -> None:
    SimpleWorker([Queue(ctx.queue_name(EVENTS_QUEUE), connection=ctx.redis)], connection=ctx.redis).work(burst=True)


@pytest.fixture
def cli_env(settings: Settings) -> dict[str, str]:
    """The environment under which the `wxcoupon` CLI loads the test settings."""
    return procs.settings_env(settings, REDIS_URL=settings.redis_url or "")


def test_replay_status_takes_only_that_status_and_the_workers_finish_them(
    client: Any, settings: Settings, worker_ctx: WorkerContext
) -> None:
    """--status failed queues exactly the failed events, in jobs; processed, dead and pending stay as they were."""
    push_n(client, settings, 6)
    set_status(worker_ctx, "failed", 1, 2, last_error="ValueError: boom")
    set_status(worker_ctx, "dead", 3)
    set_status(worker_ctx, "processed", 4)
    before = rows(worker_ctx)
    result = replay(worker_ctx, EventFilter(statuses=("failed",)))
    assert (result.matched, result.queued) == (2, 2)
    assert sorted(i for ids in queued_jobs(worker_ctx).values() for i in ids) == [1, 2]
    after = rows(worker_ctx)
    assert [after[i]["status"] for i in range(1, 7)] == ["queued", "queued", "dead", "processed", "pending", "pending"]
    assert after[4] == before[4]
    work(worker_ctx)
    assert [rows(worker_ctx)[i]["status"] for i in (1, 2)] == ["processed", "processed"]


def test_dead_events_are_revived_by_replay(client: Any, settings: Settings, worker_ctx: WorkerContext) -> None:
    """A dead letter comes back: replay --status dead queues it and a worker processes it."""
    push_n(client, settings, 2)
    set_status(worker_ctx, "dead", 1, 2, attempts=4)
    assert replay(worker_ctx, EventFilter(statuses=("dead",))).queued == 2
    work(worker_ctx)
    assert statuses(worker_ctx) == ["processed", "processed"]
    assert [r["attempts"] for r in rows(worker_ctx).values()] == [5, 5]


def test_a_row_that_killed_its_workers_is_replayed_alone(client: Any, settings: Settings, worker_ctx: WorkerContext) -> None:
    """Dead after its losses, it goes in a job of its own: if it kills a worker again, no other row goes with it."""
    push_n(client, settings, 5)
    killer = LOST_DEAD.format(count=3, reason="worker lost: w1 stopped answering while it held this row")
    set_status(worker_ctx, "dead", 1, 2, 4, 5, last_error="TransientWeixinError: busy")
    set_status(worker_ctx, "dead", 3, last_error=killer)
    assert replay(worker_ctx, EventFilter(statuses=("dead",))).queued == 5
    assert sorted(queued_jobs(worker_ctx).values()) == [[1, 2, 4, 5], [3]]
    Queue(worker_ctx.queue_name(EVENTS_QUEUE), connection=worker_ctx.redis).empty()
    set_status(worker_ctx, "dead", 1, 2, 3, 4, 5, job_id=None)
    assert replay_ids(worker_ctx, [2, 3, 4]).queued == 3
    assert sorted(queued_jobs(worker_ctx).values()) == [[2, 4], [3]]


def test_replaying_a_processed_event_changes_nothing(client: Any, settings: Settings, worker_ctx: WorkerContext) -> None:
    """Replay by id of a processed (or in-flight) event leaves its row exactly as it was and queues no job."""
    push_n(client, settings, 3)
    set_status(worker_ctx, "processed", 1)
    set_status(worker_ctx, "processing", 2, job_id="evt-running")
    before = rows(worker_ctx)
    result = replay_ids(worker_ctx, [1, 2, 99])
    assert result.queued == 0 and queued_jobs(worker_ctx) == {}
    assert result.unchanged == {1: "processed: not replayed", 2: "processing: not replayed", 99: "no such event"}
    assert rows(worker_ctx) == before


def test_replay_filters_select_by_event_card_and_time(client: Any, settings: Settings, worker_ctx: WorkerContext) -> None:
    """--event, --card-id, --since and --until each narrow what is replayed."""
    push_n(client, settings, 4)
    set_status(worker_ctx, "failed", 1, 2, 3, 4)
    old = utcnow() - dt.timedelta(days=2)
    with worker_ctx.engine.begin() as conn:
        conn.execute(sa.update(events).where(events.c.id == 1).values(received_at=old))
        conn.execute(sa.update(events).where(events.c.id == 2).values(card_id="pOtherCard"))
        conn.execute(sa.update(events).where(events.c.id == 3).values(event="user_del_card"))
    count = lambda flt: replay(worker_ctx, flt, dry_run=True).matched  # noqa: E731
    assert count(EventFilter(statuses=("failed",))) == 4
    assert count(EventFilter(statuses=("failed",), card_id="pOtherCard")) == 1
    assert count(EventFilter(statuses=("failed",), event="user_del_card")) == 1
    assert count(EventFilter(statuses=("failed",), since=utcnow() - dt.timedelta(days=1))) == 3
    assert count(EventFilter(statuses=("failed",), until=utcnow() - dt.timedelta(days=1))) == 1
    result = replay(worker_ctx, EventFilter(statuses=("failed",), event="user_consume_card", card_id=rows(worker_ctx)[4]["card_id"],
                                            since=utcnow() - dt.timedelta(days=1)))
    assert result.queued == 1 and [i for ids in queued_jobs(worker_ctx).values() for i in ids] == [4]


def test_dry_run_lists_and_counts_but_changes_nothing(
    client: Any, settings: Settings, worker_ctx: WorkerContext, cli_env: dict[str, str]
) -> None:
    """`replay --status failed --dry-run` prints each event and the count; no row or queue changes."""
    push_n(client, settings, 3)
    set_status(worker_ctx, "failed", 1, 3)
    before = rows(worker_ctx)
    result = CliRunner().invoke(main, ["replay", "--status", "failed", "--dry-run"], env=cli_env)
    assert result.exit_code == 0, result.output
    assert "would replay 2 event(s)" in result.output
    listed = [line.split()[0] for line in result.output.splitlines() if line.strip()[:1].isdigit()]
    assert listed == ["1", "3"]
    assert rows(worker_ctx) == before and queued_jobs(worker_ctx) == {}
    result = CliRunner().invoke(main, ["replay", "--status", "failed"], env=cli_env)
    assert result.exit_code == 0 and "replayed 2 event(s) in 1 job(s)" in result.output
    bad = CliRunner().invoke(main, ["replay"], env=cli_env)
    assert bad.exit_code == 2 and "--status" in bad.output


def test_interrupted_replay_leaves_nothing_stranded_and_a_rerun_finishes(
    client: Any, settings: Settings, worker_ctx: WorkerContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C during the second page: page 1 stays queued, page 2 goes back to pending, the rest stays failed;
    running the replay again queues every remaining event exactly once."""
    push_n(client, settings, 7)
    set_status(worker_ctx, "failed", *range(1, 8))
    calls = {"n": 0}
    original = Queue.enqueue_many

    def flaky(self: Queue, *args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Queue, "enqueue_many", flaky)
    with pytest.raises(KeyboardInterrupt):
        replay(worker_ctx, EventFilter(statuses=("failed",)), page=3)
    assert statuses(worker_ctx) == ["queued"] * 3 + ["pending"] * 3 + ["failed"]
    first = queued_jobs(worker_ctx)
    result = replay(worker_ctx, EventFilter(statuses=("failed", "pending")), page=3)
    assert result.queued == 4
    every = [i for ids in queued_jobs(worker_ctx).values() for i in ids]
    assert sorted(every) == list(range(1, 8))  # each event in exactly one job
    assert set(first) <= set(queued_jobs(worker_ctx))
    work(worker_ctx)
    assert statuses(worker_ctx) == ["processed"] * 7


def test_events_show_tells_raw_xml_fields_and_every_attempt(
    client: Any, settings: Settings, worker_ctx: WorkerContext, cli_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failed attempt and the successful one after a replay both appear, with time, worker and error."""
    push_n(client, settings, 1, OuterStr="showme")

    def refuse(ctx: WorkerContext, row: dict[str, Any]) -> None:
        raise ValueError("card not in this account")

    monkeypatch.setitem(handlers.HANDLERS, "user_consume_card", handlers.Handler(fetch=refuse))
    replay(worker_ctx, EventFilter(statuses=("pending",)))
    work(worker_ctx)
    assert statuses(worker_ctx) == ["failed"]
    monkeypatch.setitem(handlers.HANDLERS, "user_consume_card", handlers.Handler())
    assert replay_ids(worker_ctx, [1]).queued == 1
    work(worker_ctx)
    result = CliRunner().invoke(main, ["events", "show", "1", "--json"], env=cli_env)
    assert result.exit_code == 0, result.output
    story = json.loads(result.output)
    assert story["status"] == "processed" and story["outer_str"] == "showme"
    assert "<OuterStr><![CDATA[showme]]></OuterStr>" in story["raw_xml"]
    assert story["fields"]["Event"] == "user_consume_card"
    first, second = story["attempt_log"]
    assert (first["attempt"], first["outcome"]) == (1, "failed") and "card not in this account" in first["error"]
    assert (second["attempt"], second["outcome"], second["error"]) == (2, "processed", None)
    assert first["worker"] and first["started_at"] and first["finished_at"]
    text = CliRunner().invoke(main, ["events", "show", "1"], env=cli_env)
    assert "attempts (2):" in text.output and "raw xml:" in text.output and "card not in this account" in text.output
    missing = CliRunner().invoke(main, ["events", "show", "42"], env=cli_env)
    assert missing.exit_code == 1 and "no event 42" in missing.output


def _started_job(ctx: WorkerContext, ids: list[int], worker_name: str) -> Job:
    """A job RQ believes is running on `worker_name` (as after that worker was SIGKILLed)."""
    queue = Queue(ctx.queue_name(EVENTS_QUEUE), connection=ctx.redis)
    job = queue.enqueue(PROCESS_EVENTS, ids)
    queue.remove(job)
    job.worker_name = worker_name
    job.save()
    job.set_status(JobStatus.STARTED)
    return job


@pytest.fixture
def alive(worker_ctx: WorkerContext) -> Iterator[Heartbeat]:
    """A heartbeat for worker 'w-alive' (as a running worker keeps)."""
    beat = Heartbeat(worker_ctx, "w-alive")
    beat.beat()
    yield beat
    beat.stop()


def test_reaper_requeues_rows_of_a_dead_worker_and_leaves_a_live_ones(
    client: Any, settings: Settings, worker_ctx: WorkerContext, alive: Heartbeat
) -> None:
    """Processing rows whose job runs on a worker without heartbeat go back to pending with a lost attempt
    recorded; rows of a live worker's job, however old, are left alone; the requeued ones are processed once."""
    push_n(client, settings, 4)
    dead_job = _started_job(worker_ctx, [1, 2], "w-dead")
    live_job = _started_job(worker_ctx, [3, 4], "w-alive")
    long_ago = utcnow() - dt.timedelta(hours=1)
    set_status(worker_ctx, "processing", 1, 2, job_id=dead_job.id, attempts=1, updated_at=long_ago)
    set_status(worker_ctx, "processing", 3, 4, job_id=live_job.id, attempts=1, updated_at=long_ago)
    assert reap_stuck(worker_ctx) == 2
    after = rows(worker_ctx)
    assert [after[i]["status"] for i in (1, 2, 3, 4)] == ["pending", "pending", "processing", "processing"]
    assert after[1]["job_id"] is None and "w-dead" in after[1]["last_error"]
    with worker_ctx.engine.connect() as conn:
        lost = conn.execute(sa.select(event_attempts.c.event_id, event_attempts.c.outcome)).all()
    assert sorted(lost) == [(1, "retrying"), (2, "retrying")]
    assert reap_stuck(worker_ctx) == 0  # nothing twice
    replay(worker_ctx, EventFilter(statuses=("pending",)))
    work(worker_ctx)
    assert [rows(worker_ctx)[i]["status"] for i in (1, 2)] == ["processed", "processed"]
    assert [rows(worker_ctx)[i]["attempts"] for i in (1, 2)] == [2, 2]
    # The old job, if RQ ever ran it again, finds no row queued under its id.
    assert dead_job.id not in {r["job_id"] for r in rows(worker_ctx).values()}


def test_reaper_handles_gone_and_ended_jobs_and_young_rows(
    client: Any, settings: Settings, worker_ctx: WorkerContext
) -> None:
    """Processing rows of a job that no longer exists are requeued; queued rows on a dead worker's started job
    too; rows younger than the heartbeat lifetime are not looked at yet."""
    push_n(client, settings, 3)
    long_ago = utcnow() - dt.timedelta(hours=1)
    set_status(worker_ctx, "processing", 1, job_id="evt-vanished", updated_at=long_ago)
    job = _started_job(worker_ctx, [2], "w-gone")
    set_status(worker_ctx, "queued", 2, job_id=job.id, updated_at=long_ago)
    set_status(worker_ctx, "processing", 3, job_id="evt-young", updated_at=utcnow())
    assert reap_stuck(worker_ctx) == 2
    assert statuses(worker_ctx) == ["pending", "pending", "processing"]


def test_heartbeat_expires_when_a_worker_stops_beating(worker_ctx: WorkerContext) -> None:
    """The key lives heartbeat_ttl; a clean stop removes it at once."""
    ctx = WorkerContext(settings=worker_ctx.settings.with_overrides(heartbeat_ttl=2.0), engine=worker_ctx.engine,
                        redis=worker_ctx.redis)
    beat = Heartbeat(ctx, "w-1")
    beat.beat()
    key = heartbeat_key(ctx.settings.queue_prefix, "w-1")
    assert 0 < ctx.redis.pttl(key) <= 2000
    assert set(live_workers(ctx)) == {"w-1"} and live_workers(ctx)["w-1"]["pid"] > 0
    beat.stop()
    assert not ctx.redis.exists(key)


def test_sweep_requeues_dead_workers_rows_and_dispatches(
    client: Any, settings: Settings, worker_ctx: WorkerContext, cli_env: dict[str, str]
) -> None:
    """`wxcoupon sweep` returns a dead worker's rows to the outbox and queues them with the pending ones."""
    push_n(client, settings, 2)
    job = _started_job(worker_ctx, [1], "w-dead")
    set_status(worker_ctx, "processing", 1, job_id=job.id, updated_at=utcnow() - dt.timedelta(hours=1))
    result = CliRunner().invoke(main, ["sweep"], env=cli_env)
    assert result.exit_code == 0, result.output
    assert "queued 2 pending event(s)" in result.output and "took back 1 from dead workers or jobs" in result.output
    assert statuses(worker_ctx) == ["queued", "queued"]


def test_cli_out_of_range_numbers_are_usage_errors(settings: Settings, cli_env: dict[str, str]) -> None:
    """`events show` and `replay` refuse an id past 2**63 - 1 as a usage error, not a traceback; a
    `--limit` of 0 and `simulate --repeat 0` (which used to send once) too."""
    for args in (["events", "show", str(2**63)], ["replay", str(2**63)], ["events", "list", "--limit", "0"],
                 ["simulate", "user_get_card", "--url", "http://127.0.0.1:9/wechat", "--repeat", "0"]):
        result = CliRunner().invoke(main, args, env=cli_env)
        assert result.exit_code == 2 and "Invalid value" in result.output, (args, result.output)
