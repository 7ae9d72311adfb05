"""Bulk replay of stored failed events, beside a raw RQ `enqueue_many` of the same jobs.

    python bench/replay.py [--events 100000] [--job-batch 1 --job-batch 50] [--database-url URL] [--redis-url URL]

It stores N events with status `failed`, then, for each job size, measures in
the same run and against the same Redis:

  raw     Queue.enqueue_many of the same number of jobs (same function, same
          arguments shape, same retry policy), pipelined per page as replay is;
  replay  `workers.replay.replay(--status failed)`: select a page by id, revive
          and mark it queued in one transaction, enqueue its jobs in one pipeline.

raw runs before and after replay (its mean is the baseline), so drift in the
machine's speed does not favour either side. The Redis database must be empty
(it is flushed between runs and at the end): by default db 15 of the local Redis.

The target (replay at >= 50% of the raw rate, constant memory) is for one job
per event: 100,000 events, 100,000 jobs on both sides. With the deployment's
50 events per job, replay moves far more events per second, but Redis then does
50 times less work than the database, which must still change one row per
event; that ratio is printed too, as information. Peak RSS growth during each
replay shows the memory staying flat.
"""
from __future__ import annotations

import argparse
import gc
import resource
import secrets
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import redis  # noqa: E402
from rq import Queue  # noqa: E402
from sqlalchemy import update  # noqa: E402
from tqdm import tqdm  # noqa: E402

from webhook import schema  # noqa: E402
from webhook.config import Settings  # noqa: E402
from webhook.store import events, make_engine, utcnow  # noqa: E402
from workers.context import EVENTS_QUEUE, WorkerContext  # noqa: E402
from workers.dispatch import PROCESS_EVENTS  # noqa: E402
from workers.failures import job_retry  # noqa: E402
from workers.replay import PAGE, EventFilter, count_replayable, replay  # noqa: E402

INSERT_CHUNK = 5000


def rss_mib() -> float:
    """Resident memory of this process now, in MiB."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**20


def store_failed_events(ctx: WorkerContext, n: int) -> None:
    """Insert n events in status failed, in chunks (what a bad deploy leaves behind)."""
    now = utcnow()
    base = {
        "msg_type": "event", "event": "user_get_card", "to_user": "gh_bench", "card_id": "pBenchCard",
        "create_time": int(now.timestamp()), "mode": "safe", "raw_xml": "<xml><Event>user_get_card</Event></xml>",
        "fields": {"Event": "user_get_card"}, "status": "failed", "attempts": 1,
        "last_error": "TransientWeixinError: -1 system busy", "received_at": now, "updated_at": now,
    }  # fmt: skip
    with tqdm(total=n, unit="event", desc="storing", leave=False) as bar:
        for start in range(0, n, INSERT_CHUNK):
            rows = [
                {**base, "dedupe_key": f"bench-{i}", "openid": f"oBench{i}", "code": f"{700000000000 + i}"}
                for i in range(start, min(n, start + INSERT_CHUNK))
            ]
            with ctx.engine.begin() as conn:
                conn.execute(events.insert(), rows)
            bar.update(len(rows))


def raw_enqueue(ctx: WorkerContext, n: int) -> tuple[float, int]:
    """enqueue_many of the jobs replay makes for n events (ids 1..n), one pipeline per page; (seconds, jobs)."""
    queue = Queue(ctx.queue_name(EVENTS_QUEUE), connection=ctx.redis)
    retry = job_retry(ctx.settings.retry_intervals)
    batch = ctx.settings.job_batch
    jobs = 0
    started = time.perf_counter()
    for page_start in range(1, n + 1, PAGE):
        ids = list(range(page_start, min(n, page_start + PAGE - 1) + 1))
        datas = [
            Queue.prepare_data(PROCESS_EVENTS, args=(ids[i : i + batch],), job_id=f"raw-{secrets.token_hex(8)}",
                               description=f"replay: {len(ids[i : i + batch])}", retry=retry)
            for i in range(0, len(ids), batch)
        ]  # fmt: skip
        with ctx.redis.pipeline() as pipe:
            queue.enqueue_many(datas, pipeline=pipe)
            pipe.execute()
        jobs += len(datas)
    return time.perf_counter() - started, jobs


def run_replay(ctx: WorkerContext, n: int) -> tuple[float, int, float]:
    """Replay every failed event; (seconds, jobs, RSS growth in MiB)."""
    flt = EventFilter(statuses=("failed",))
    total = count_replayable(ctx, flt)
    assert total == n, f"expected {n} failed events, found {total}"
    gc.collect()
    before = peak = rss_mib()

    def on_page(rows: list[dict[str, Any]]) -> None:
        nonlocal peak
        bar.update(len(rows))
        peak = max(peak, rss_mib())

    started = time.perf_counter()
    with tqdm(total=total, unit="event", desc="replay", leave=False) as bar:
        result = replay(ctx, flt, on_page=on_page)
    elapsed = time.perf_counter() - started
    assert result.queued == n, result
    return elapsed, result.jobs, peak - before


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print its figures."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--job-batch", type=int, action="append", help="events per job; repeatable [default: 1 and 50]")
    parser.add_argument("--database-url", default=None, help="default: a SQLite file in a temporary folder")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/15")
    args = parser.parse_args(argv)

    client = redis.Redis.from_url(args.redis_url)
    if client.dbsize():
        print(f"{args.redis_url} is not empty; use an empty database (it is flushed)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(
            token="benchtoken", database_url=args.database_url or f"sqlite:///{tmp}/bench.sqlite3",
            redis_url=args.redis_url, instance_path=Path(tmp), sqlite_synchronous="NORMAL",
        )  # fmt: skip
        engine = make_engine(settings)
        schema.upgrade(engine)
        try:
            base = WorkerContext(settings=settings, engine=engine, redis=client)
            store_failed_events(base, args.events)
            with engine.begin() as conn:  # statistics, as a live database has them (autovacuum)
                conn.exec_driver_sql("ANALYZE")
            for job_batch in args.job_batch or [1, 50]:
                with engine.begin() as conn:  # every event failed again, as stored
                    conn.execute(update(events).values(status="failed", job_id=None))
                ctx = WorkerContext(settings=settings.with_overrides(job_batch=job_batch), engine=engine, redis=client)
                report(ctx, args.events)
            return 0
        finally:
            client.flushdb()
            engine.dispose()


def report(ctx: WorkerContext, n: int) -> None:
    """Measure raw, replay, raw again; print."""
    ctx.redis.flushdb()
    raw_1, raw_jobs = raw_enqueue(ctx, n)
    ctx.redis.flushdb()
    replay_s, replay_jobs, grown = run_replay(ctx, n)
    ctx.redis.flushdb()
    raw_2, _ = raw_enqueue(ctx, n)
    raw_s = (raw_1 + raw_2) / 2
    assert raw_jobs == replay_jobs, (raw_jobs, replay_jobs)
    db = ctx.engine.url.get_backend_name()
    print(f"{n:,} failed events, {replay_jobs:,} jobs of up to {ctx.settings.job_batch} events, {db} + Redis")
    print(f"  raw enqueue_many  {raw_s:7.2f} s  {raw_jobs / raw_s:9,.0f} jobs/s  {n / raw_s:9,.0f} events/s"
          f"   (runs: {raw_1:.2f} s, {raw_2:.2f} s)")
    print(f"  replay            {replay_s:7.2f} s  {replay_jobs / replay_s:9,.0f} jobs/s  {n / replay_s:9,.0f} events/s"
          f"   (peak RSS growth {grown:.1f} MiB)")
    target = "   (target: >= 50%)" if ctx.settings.job_batch == 1 else "   (information: see the docstring)"
    print(f"  replay / raw      {raw_s / replay_s:7.0%}{target}")


if __name__ == "__main__":
    raise SystemExit(main())
