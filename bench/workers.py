"""Worker throughput benchmark: `wxcoupon worker` against RQ's own no-op job rate, one run.

    .venv/bin/python bench/workers.py [--events 20000] [--workers 2] [--database sqlite|postgres|sqlite,postgres]
                                      [--job-batch 200] [--mp-share 0.25] [--noop-jobs N] [--fork-jobs 1000]
                                      [--profile] [--json FILE]

1. Baseline. `--workers` processes of RQ's non-forking `SimpleWorker` (the class
   `wxcoupon worker` runs, started the way it starts it: INFO logging, with the
   scheduler) wait on an empty queue; N no-op jobs (`bench.workers.noop`) are
   then enqueued with `enqueue_many` in one MULTI/EXEC pipeline, and the clock
   runs from the end of that EXEC to the last job's `ended_at`. The same for RQ's
   default forking `Worker`, on a smaller N, for reference.
2. wxcoupon. For each database: a fresh one (a temp SQLite file, or a fresh
   PostgreSQL schema through search_path), `wxcoupon db upgrade`, then a bulk
   insert of `--events` stored `user_get_card` events (built as intake builds
   them: sample_fields -> XML -> parse_push -> event_row) and Mini Program
   receipts for `--mp-share` of the same cards, whose encrypt_codes come from an
   in-process fake Weixin (`FakeWeixin.add_card`). The rows are inserted in a
   status no dispatcher takes ("benchhold"); `--workers` `wxcoupon worker`
   processes are started (the fake as WECHAT_API_BASE, the machine's Redis on a
   dedicated, flushed database) and, once both are registered with RQ, one
   UPDATE makes every row `pending`. The clock runs from that UPDATE's commit
   to the last row's `updated_at`, polling the database until every row is
   processed.
3. A table of no-op jobs/s beside wxcoupon events/s and their ratio (target
   >= 5), then a correctness check: every event processed exactly once
   (attempts == 1, one attempt row each), one card per code with both holders,
   every receipt decoded once (card/code/decrypt calls) and matched.

`--profile` adds an in-process run of the job functions on a fresh database
(no RQ): SQL statements, transactions and Weixin calls per row, and cProfile's
top functions. Timings are printed, never asserted; the exit status is 1 only
when the correctness check fails. See bench/README.md.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import re
import secrets
import signal
import string
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
# `python bench/workers.py` puts bench/ first on sys.path, where this very file
# would shadow the project's `workers` package: take bench/ off, put the repo first.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != BENCH]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
sys.path.append(str(BENCH))  # last: the sibling helpers (bench/pgschema.py), never ahead of the project

from pgschema import create_pg_schema, drop_pg_schema, pg_schema_url  # noqa: E402  (bench/pgschema.py)

from webhook.config import DEFAULT_JOB_BATCH  # noqa: E402

NOOP = "bench.workers.noop"  # the baseline job, imported by the RQ workers from the repo root
DEFAULT_POSTGRES_URL = os.environ.get("TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/9"
HOLD = "benchhold"  # a status no dispatcher takes: rows wait in it until the clock starts
TARGET_RATIO = 5.0
MAX_EVENTS = 200_000  # bounded sizes
QUIET_SHARE = 0.15
CARD_IDS = 4  # campaigns the cards are spread over
_ALNUM = string.ascii_letters + string.digits


def noop() -> None:
    """The baseline job: nothing at all."""


# ---------------------------------------------------------------- processes and CPU


def proc_cpu(pid: int, children: bool = True) -> float:
    """CPU seconds used by `pid` (and its waited-for children, e.g. a forking worker's horses)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    parts = raw[raw.rindex(")") + 2 :].split()
    utime, stime, cutime, cstime = (int(v) for v in parts[11:15])
    ticks = utime + stime + ((cutime + cstime) if children else 0)
    return ticks / os.sysconf("SC_CLK_TCK")


def machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of all CPUs together, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    user, nice, system, idle, iowait, irq, softirq, steal = values
    tick = os.sysconf("SC_CLK_TCK")
    total = sum(values)
    return (total - idle - iowait) / tick, total / tick


def wait_for_quiet(max_wait: float) -> float:
    """Wait (at most `max_wait` s) until the CPUs are less than QUIET_SHARE busy over 1 s; the last reading."""
    deadline = time.monotonic() + max_wait
    while True:
        b0, t0 = machine_cpu()
        time.sleep(1.0)
        b1, t1 = machine_cpu()
        share = (b1 - b0) / (t1 - t0) if t1 > t0 else 0.0
        if share < QUIET_SHARE or time.monotonic() >= deadline:
            return share


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without wxcoupon's settings, plus `extra`."""
    prefixes = ("WECHAT_", "WXCOUPON_", "DATABASE_URL", "REDIS_URL", "MP_API_KEY", "WEB_CONCURRENCY")
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(extra)
    return env


class Procs:
    """Worker processes in a session of their own: start, CPU, stop (only what we started)."""

    def __init__(self, name: str, argvs: list[list[str]], env: dict[str, str], cwd: Path) -> None:
        self.name, self.argvs, self.env, self.cwd = name, argvs, env, cwd
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: list[Path] = []

    def start(self) -> None:
        for i, argv in enumerate(self.argvs):
            log = self.cwd / f"{self.name}-{i}.log"
            self.logs.append(log)
            with log.open("wb") as out:
                self.procs.append(subprocess.Popen(
                    argv, env=self.env, cwd=self.cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                ))  # fmt: skip

    def check_alive(self) -> None:
        for proc, log in zip(self.procs, self.logs):
            if proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {proc.returncode}:\n{tail(log)}")

    def cpu(self) -> float:
        return sum(proc_cpu(p.pid) for p in self.procs)

    def stop(self) -> None:
        """SIGTERM (RQ's warm shutdown), then SIGKILL the sessions we started if they hang."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 20
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)  # the session we started, nothing else
                except ProcessLookupError:
                    pass
                proc.wait()
        # The RQ scheduler runs as a child process of a worker; it follows its parent
        # out, but make sure nothing of our sessions outlives the run.
        for proc in self.procs:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(f"--- {log.name}\n{tail(log, lines)}" for log in self.logs)


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def redis_client(url: str) -> Any:
    """A client with the options wxcoupon's workers use (webhook.redisconn)."""
    import redis

    return redis.Redis.from_url(url, socket_timeout=5.0, socket_connect_timeout=2.0, health_check_interval=30)


def wait_registered(conn: Any, queue_name: str, count: int, procs: Procs, timeout: float = 60.0) -> float:
    """Block until `count` RQ workers listen on `queue_name`; the seconds it took."""
    from rq import Queue, Worker

    queue = Queue(queue_name, connection=conn)
    started = time.monotonic()
    while Worker.count(connection=conn, queue=queue) < count:
        procs.check_alive()
        if time.monotonic() - started > timeout:
            raise RuntimeError(f"{procs.name}: workers not registered after {timeout}s:\n{procs.log_tail()}")
        time.sleep(0.05)
    return time.monotonic() - started


def as_epoch(value: Any) -> float:
    """A datetime from a DB or RQ (naive means UTC) as a Unix time."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.timezone.utc)
    return float(value.timestamp())


# ---------------------------------------------------------------- results


@dataclass
class Phase:
    """One measured run."""

    label: str
    items: int  # jobs, or events + MP records
    wall_s: float
    per_s: float
    worker_cpu_ms: float | None = None  # worker processes' CPU per item
    machine_busy: float | None = None  # share of all CPUs busy during the run
    events: int = 0
    records: int = 0
    events_per_s: float | None = None
    notes: list[str] = field(default_factory=list)
    checks: dict[str, bool] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------- 1. RQ's own no-op rate


def rq_worker_main(kind: str, queue_name: str, redis_url: str, name: str) -> None:
    """The baseline worker process: RQ's worker class started as `wxcoupon worker` starts its own."""
    import logging

    from rq import Queue, SimpleWorker, Worker

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    conn = redis_client(redis_url)
    cls = SimpleWorker if kind == "simple" else Worker
    worker = cls([Queue(queue_name, connection=conn)], connection=conn, name=name)
    worker.work(logging_level="INFO", with_scheduler=True)


def run_noop(kind: str, jobs: int, args: argparse.Namespace, workdir: Path) -> Phase:
    """N no-op jobs through `args.workers` RQ workers of `kind` (simple | fork)."""
    from rq import Queue
    from rq.job import Job
    from rq.utils import utcparse

    label = f"RQ no-op, {'SimpleWorker' if kind == 'simple' else 'forking Worker'} x{args.workers}"
    print(f"\n== {label}: {jobs} jobs", flush=True)
    conn = redis_client(args.redis_url)
    conn.flushdb()
    queue_name = f"bench-noop-{kind}"
    queue = Queue(queue_name, connection=conn)
    workdir.mkdir(parents=True, exist_ok=True)
    argvs = [
        [sys.executable, str(BENCH / "workers.py"), "--rq-worker", kind, queue_name, args.redis_url,
         f"bench-{kind}-{i}-{secrets.token_hex(3)}"]
        for i in range(args.workers)
    ]  # fmt: skip
    procs = Procs(f"rq-{kind}", argvs, clean_env(), workdir)
    procs.start()
    try:
        took = wait_registered(conn, queue_name, args.workers, procs)
        print(f"  {args.workers} workers registered in {took:.1f}s", flush=True)
        quiet(args)
        # The first job imports bench.workers in each worker: warm that up outside the clock.
        warm = [Queue.prepare_data(NOOP, job_id=f"warm-{i}") for i in range(2 * args.workers)]
        with conn.pipeline() as pipe:
            queue.enqueue_many(warm, pipeline=pipe)
            pipe.execute()
        wait_jobs(queue, len(warm), procs, 60)
        datas = [Queue.prepare_data(NOOP, job_id=f"noop-{i}") for i in range(jobs)]
        prep0 = time.perf_counter()
        pipe = conn.pipeline()
        queue.enqueue_many(datas, pipeline=pipe)
        prepared = time.perf_counter() - prep0
        cpu0, (busy0, total0) = procs.cpu(), machine_cpu()
        sent = time.time()
        pipe.execute()  # MULTI/EXEC: no job is visible to the workers before this returns
        t0 = time.time()
        enqueued = t0 - sent
        wait_jobs(queue, len(warm) + jobs, procs, max(120.0, jobs / 5.0))
        cpu1, (busy1, total1) = procs.cpu(), machine_cpu()
        with conn.pipeline(transaction=False) as p:
            for i in range(jobs):
                p.hget(Job.key_for(f"noop-{i}"), "ended_at")
            ended = [as_epoch(utcparse(v.decode())) for v in p.execute() if v]
        failed = queue.failed_job_registry.count
    finally:
        procs.stop()
    wall = max(ended) - t0
    phase = Phase(
        label=label, items=jobs, wall_s=wall, per_s=jobs / wall, worker_cpu_ms=(cpu1 - cpu0) * 1000 / jobs,
        machine_busy=(busy1 - busy0) / (total1 - total0) if total1 > total0 else None,
    )
    phase.extra = {"enqueue_prepare_s": prepared, "enqueue_execute_s": enqueued, "failed_jobs": failed}
    phase.checks["every no-op job finished"] = len(ended) == jobs and failed == 0
    print(f"  enqueue_many: {prepared:.2f}s to build the pipeline, {enqueued:.2f}s to execute it", flush=True)
    print_phase(phase)
    conn.flushdb()
    conn.close()
    return phase


def wait_jobs(queue: Any, count: int, procs: Procs, timeout: float) -> None:
    """Until `count` jobs of `queue` have finished or failed."""
    deadline = time.monotonic() + timeout
    while queue.finished_job_registry.count + queue.failed_job_registry.count < count:
        procs.check_alive()
        if time.monotonic() > deadline:
            raise RuntimeError(f"{procs.name}: jobs not done after {timeout:.0f}s:\n{procs.log_tail()}")
        time.sleep(0.02)


# ---------------------------------------------------------------- 2. wxcoupon


@dataclass(frozen=True)
class Account:
    """A throwaway Official Account, shared by the fake Weixin and the workers."""

    token: str
    encoding_aes_key: str
    appid: str
    appsecret: str
    original_id: str

    @classmethod
    def generate(cls) -> Account:
        pick = lambda n: "".join(secrets.choice(_ALNUM) for _ in range(n))  # noqa: E731
        return cls(token=pick(32), encoding_aes_key=pick(43), appid="wxbench" + secrets.token_hex(5),
                   appsecret=secrets.token_hex(16), original_id="gh_" + secrets.token_hex(6))  # fmt: skip

    def env(self) -> dict[str, str]:
        return {"WECHAT_TOKEN": self.token, "WECHAT_AES_KEY": self.encoding_aes_key,
                "WECHAT_APPID": self.appid, "WECHAT_APPSECRET": self.appsecret}  # fmt: skip


@dataclass
class Dataset:
    """What was stored, to check the result against."""

    events: int
    records: int
    oa_openid: dict[tuple[str, str], str]  # (card_id, code) -> FromUserName of its push
    mp_openid: dict[tuple[str, str], str]  # (card_id, code) -> mp_openid of its receipt
    encrypt_code: dict[str, tuple[str, str]]  # encrypt_code -> (card_id, code)


def fill(engine: Any, fake: Any, account: Account, n: int, mp_share: float, status: str = HOLD) -> Dataset:
    """Give users `n` cards in the fake, store their pushes and receipts for `mp_share` of them."""
    import sqlalchemy as sa

    from webhook.cardstore import RecordKind, mp_records
    from webhook.mp_api import record_key
    from webhook.store import events, utcnow
    from stored import stored_event_row  # bench/stored.py

    tag = secrets.token_hex(4)
    card_ids = [f"pBENCH{tag}{k:02d}" + "x" * 12 for k in range(CARD_IDS)]  # 28 characters, like a real card_id
    code_base = 100_000_000_000 + secrets.randbelow(10**11)
    rng = random.Random(n)
    with_receipt = set(rng.sample(range(n), int(round(n * mp_share))))
    now = int(time.time()) - 60
    data = Dataset(n, len(with_receipt), {}, {}, {})
    event_rows: list[dict[str, Any]] = []
    record_rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    for i in range(n):
        card_id, code = card_ids[i % CARD_IDS], str(code_base + i)
        openid, unionid = f"oWXB{tag}{i:016d}", f"uWXB{tag}{i:016d}"
        outer = f"poster-{i % 7}"
        added = fake.add_card(card_id, openid, code=code, outer_str=outer, unionid=unionid)
        row = stored_event_row(
            "user_get_card", ToUserName=account.original_id, FromUserName=openid, CreateTime=now + i // 500,
            CardId=card_id, UserCardCode=code, OuterStr=outer, UnionId=unionid,
        )  # fmt: skip
        row["status"] = status
        event_rows.append(row)
        data.oa_openid[(card_id, code)] = openid
        if i in with_receipt:
            mp_openid, stamp = f"oMPB{tag}{i:016d}", utcnow()
            data.mp_openid[(card_id, code)] = mp_openid
            data.encrypt_code[added["encrypt_code"]] = (card_id, code)
            record_rows.append({
                "dedupe_key": record_key(RecordKind.RECEIPT, card_id, added["encrypt_code"], mp_openid),
                "kind": RecordKind.RECEIPT.value, "card_id": card_id, "encrypt_code": added["encrypt_code"],
                "mp_openid": mp_openid, "unionid": unionid, "is_success": True, "status": status,
                "attempts": 0, "created_at": stamp, "updated_at": stamp,
            })  # fmt: skip
    built = time.perf_counter() - started
    started = time.perf_counter()
    with engine.begin() as conn:
        for table, rows in ((events, event_rows), (mp_records, record_rows)):
            for k in range(0, len(rows), 2000):
                conn.execute(sa.insert(table), rows[k : k + 2000])
    print(f"  {n} cards in the fake Weixin and {n} events + {len(record_rows)} receipts built in {built:.1f}s, "
          f"inserted in {time.perf_counter() - started:.1f}s", flush=True)  # fmt: skip
    return data


def status_counts(engine: Any) -> dict[str, dict[str, int]]:
    import sqlalchemy as sa

    from webhook.cardstore import mp_records
    from webhook.store import events

    out: dict[str, dict[str, int]] = {}
    with engine.connect() as conn:
        for table in (events, mp_records):
            rows = conn.execute(sa.select(table.c.status, sa.func.count()).group_by(table.c.status)).all()
            out[table.name] = {str(s): int(c) for s, c in rows}
    return out


def rows_in_flight(engine: Any) -> int:
    """Events and receipts not yet processed, failed or dead."""
    import sqlalchemy as sa

    from webhook.cardstore import mp_records
    from webhook.store import events

    waiting = [HOLD, "pending", "queued", "processing"]
    with engine.connect() as conn:
        return sum(int(conn.execute(sa.select(sa.func.count()).select_from(table).where(table.c.status.in_(waiting)))
                       .scalar_one()) for table in (events, mp_records))  # fmt: skip


def run_wxcoupon(database: str, args: argparse.Namespace, account: Account, root: Path) -> Phase:
    """Stored events and receipts reconciled by `args.workers` `wxcoupon worker` processes."""
    import sqlalchemy as sa
    from rq import Queue

    from webhook.cardstore import mp_records
    from webhook.config import load_settings
    from webhook.store import events, make_engine
    from workers.fake_weixin import FakeWeixin

    label = f"wxcoupon {database}, job batch {args.job_batch}, x{args.workers}"
    workdir = root / f"wxcoupon-{database}"
    (workdir / "instance").mkdir(parents=True)
    fake = FakeWeixin(appid=account.appid, appsecret=account.appsecret).start()
    extra = {
        **account.env(), "WECHAT_API_BASE": fake.url, "REDIS_URL": args.redis_url,
        "WXCOUPON_INSTANCE_PATH": str(workdir / "instance"), "WXCOUPON_DISPATCH_INTERVAL": str(args.dispatch_interval),
        "WXCOUPON_JOB_BATCH": str(args.job_batch), "WXCOUPON_LOG_FORMAT": "text",
    }  # fmt: skip
    if args.dispatch_batch:
        extra["WXCOUPON_DISPATCH_BATCH"] = str(args.dispatch_batch)
    pg_schema = use_database(args, database, workdir, extra)
    env = clean_env(**extra)
    settings = load_settings(env, dotenv=False)
    engine = None
    procs: Procs | None = None
    print(f"\n== {label}", flush=True)
    conn = redis_client(args.redis_url)
    conn.flushdb()
    try:
        upgrade = subprocess.run([sys.executable, "-m", "workers", "db", "upgrade"], env=env, cwd=workdir,
                                 capture_output=True, text=True, timeout=120)  # fmt: skip
        if upgrade.returncode != 0:
            raise RuntimeError(f"wxcoupon db upgrade failed:\n{upgrade.stdout}{upgrade.stderr}")
        print(f"  wxcoupon db upgrade: {upgrade.stdout.strip()}", flush=True)
        engine = make_engine(settings)
        data = fill(engine, fake, account, args.events, args.mp_share)
        argvs = [[sys.executable, "-m", "workers", "worker", "--name", f"bench-{database}-{i}-{secrets.token_hex(3)}"]
                 for i in range(args.workers)]  # fmt: skip
        procs = Procs("wxcoupon-worker", argvs, env, workdir)
        procs.start()
        took = wait_registered(conn, f"{settings.queue_prefix}-events", args.workers, procs)
        print(f"  {args.workers} workers registered in {took:.1f}s", flush=True)
        quiet(args)
        total = data.events + data.records
        cpu0, (busy0, mtotal0) = procs.cpu(), machine_cpu()
        sent = time.time()
        with engine.begin() as c:
            for table in (events, mp_records):
                c.execute(sa.update(table).where(table.c.status == HOLD).values(status="pending"))
        t0 = time.time()  # committed: from now on the dispatchers see every row
        released = t0 - sent
        deadline = time.monotonic() + args.timeout
        last_print = time.monotonic()
        while True:
            time.sleep(0.2)
            # Cheap, on the (status, id) index: the full count by status would
            # read every row 5 times a second, on the CPUs being measured.
            if rows_in_flight(engine) == 0:
                break
            procs.check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError(f"not done after {args.timeout:.0f}s: {status_counts(engine)}\n{procs.log_tail()}")
            if time.monotonic() - last_print >= 5:
                counts = status_counts(engine)
                print(f"  {time.time() - t0:5.1f}s  events {counts['events']}  mp_records {counts['mp_records']}",
                      flush=True)  # fmt: skip
                last_print = time.monotonic()
        cpu1, (busy1, mtotal1) = procs.cpu(), machine_cpu()
        with engine.connect() as c:
            end = max(as_epoch(c.execute(sa.select(sa.func.max(t.c.updated_at))).scalar_one())
                      for t in (events, mp_records) if (data.records or t is events))  # fmt: skip
        wall = end - t0
        failed_jobs = Queue(f"{settings.queue_prefix}-events", connection=conn).failed_job_registry.count
        procs.stop()
        logs = "\n".join(log.read_text(errors="replace") for log in procs.logs)
        incidents = {
            "jobs scheduled for an RQ retry": logs.count("scheduled for retry"),
            "'database is locked' errors": logs.count("sqlite3.OperationalError: database is locked"),
            "rows requeued by the reaper": sum(int(m) for m in re.findall(r"requeued stuck rows.*?rows=(\d+)", logs)),
            "dispatcher passes": logs.count("wxcoupon.dispatch: dispatched"),
            "transactions tried again": logs.count("database refused the transaction; trying again"),
            "set-based applies redone row by row": logs.count("set-based apply failed; applying row by row"),
        }
        phase = Phase(
            label=label, items=total, wall_s=wall, per_s=total / wall, worker_cpu_ms=(cpu1 - cpu0) * 1000 / total,
            machine_busy=(busy1 - busy0) / (mtotal1 - mtotal0) if mtotal1 > mtotal0 else None,
            events=data.events, records=data.records, events_per_s=data.events / wall,
        )  # fmt: skip
        phase.extra = {"release_update_s": released, "failed_jobs": failed_jobs, "weixin_calls": fake.stats(),
                       "database_url": redact(settings.database_url), "incidents": incidents}  # fmt: skip
        print(f"  released the rows in {released:.2f}s (before the clock); from the worker logs: "
              + ", ".join(f"{k} {v}" for k, v in incidents.items()), flush=True)  # fmt: skip
        check(engine, data, fake, phase)
        print_phase(phase)
        return phase
    finally:
        if procs is not None:
            procs.stop()
        if engine is not None:
            engine.dispose()
        fake.stop()
        conn.flushdb()
        conn.close()
        if pg_schema:
            drop_pg_schema(args.postgres_url, pg_schema)


def use_database(args: argparse.Namespace, database: str, workdir: Path, extra: dict[str, str]) -> str | None:
    """Point `extra` (the run's environment) at a fresh database; the PostgreSQL schema to drop, if any."""
    if database == "sqlite":
        extra["DATABASE_URL"] = f"sqlite:///{workdir / 'wxcoupon.sqlite3'}"
        extra["WXCOUPON_SQLITE_SYNCHRONOUS"] = args.synchronous
        return None
    pg_schema = f"wxbench_{secrets.token_hex(6)}"
    create_pg_schema(args.postgres_url, pg_schema)
    extra["DATABASE_URL"] = pg_schema_url(args.postgres_url, pg_schema)
    return pg_schema

def check(engine: Any, data: Dataset, fake: Any, phase: Phase) -> None:
    """Every event processed exactly once, one card per code with both holders, every receipt matched."""
    import sqlalchemy as sa

    from webhook.cardstore import cards, mp_records
    from webhook.store import event_attempts, events

    checks = phase.checks
    with engine.connect() as conn:
        ev = conn.execute(sa.select(
            sa.func.count(),
            sa.func.count().filter(events.c.status == "processed"),
            sa.func.count().filter(events.c.attempts == 1),
        )).one()  # fmt: skip
        checks[f"{data.events} events, all processed, attempts == 1"] = tuple(ev) == (data.events,) * 3
        at = conn.execute(sa.select(
            sa.func.count(), sa.func.count(sa.distinct(event_attempts.c.event_id)),
            sa.func.count().filter(event_attempts.c.outcome == "processed"),
        )).one()  # fmt: skip
        checks["one attempt row per event, outcome processed"] = tuple(at) == (data.events,) * 3
        rows = conn.execute(sa.select(cards.c.card_id, cards.c.code, cards.c.status, cards.c.origin,
                                      cards.c.oa_openid, cards.c.mp_openid)).all()  # fmt: skip
        found = {(r.card_id, r.code): r for r in rows}
        checks[f"{data.events} cards, one per code"] = len(rows) == data.events and found.keys() == data.oa_openid.keys()
        checks["every card received from a push, OA holder right"] = all(
            r.status == "received" and r.origin == "push" and r.oa_openid == data.oa_openid.get(k)
            for k, r in found.items()
        )
        checks[f"{data.records} cards with the MP holder right, the others none"] = all(
            r.mp_openid == data.mp_openid.get(k) for k, r in found.items()
        )
        recs = conn.execute(sa.select(mp_records.c.encrypt_code, mp_records.c.card_id, mp_records.c.code,
                                      mp_records.c.status, mp_records.c.attempts, mp_records.c.match)).all()  # fmt: skip
        checks[f"{data.records} MP records processed once, decoded right, matched"] = len(recs) == data.records and all(
            r.status == "processed" and r.attempts == 1 and r.match == "matched"
            and data.encrypt_code.get(r.encrypt_code) == (r.card_id, r.code)
            for r in recs
        )
    decrypts = fake.calls("/card/code/decrypt")
    checks[f"card/code/decrypt called once per record ({decrypts})"] = decrypts == data.records
    checks["no failed RQ job"] = phase.extra.get("failed_jobs") == 0


def redact(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if not parts.password:
        return url
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@")))


def quiet(args: argparse.Namespace) -> None:
    if args.quiet_wait > 0:
        busy = wait_for_quiet(args.quiet_wait)
        if busy >= QUIET_SHARE:
            print(f"  NOTE: the CPUs are {100 * busy:.0f}% busy with other work before the measured run "
                  f"(waited {args.quiet_wait:g}s); figures will be low", flush=True)  # fmt: skip


# ---------------------------------------------------------------- --profile: the job functions in-process


def run_profile(database: str, args: argparse.Namespace, account: Account, root: Path) -> dict[str, Any]:
    """The job functions called directly (no RQ) on a fresh database: where a row's time goes."""
    import cProfile
    import io
    import pstats

    import redis
    import sqlalchemy as sa
    from sqlalchemy import event

    from webhook.cardstore import mp_records
    from webhook.config import load_settings
    from webhook.store import events, make_engine
    from workers import jobs
    from workers.context import WorkerContext, install
    from workers.dispatch import dispatch_once
    from workers.fake_weixin import FakeWeixin

    n = min(args.events, args.profile_events)
    print(f"\n== profile: job functions in-process on {database}, {n} events, job batch {args.job_batch}", flush=True)
    workdir = root / f"profile-{database}"
    (workdir / "instance").mkdir(parents=True)
    fake = FakeWeixin(appid=account.appid, appsecret=account.appsecret).start()
    extra = {**account.env(), "WECHAT_API_BASE": fake.url, "REDIS_URL": args.redis_url,
             "WXCOUPON_INSTANCE_PATH": str(workdir / "instance"), "WXCOUPON_JOB_BATCH": str(args.job_batch)}  # fmt: skip
    pg_schema = use_database(args, database, workdir, extra)
    env = clean_env(**extra)
    settings = load_settings(env, dotenv=False)
    rconn = redis.Redis.from_url(args.redis_url)
    rconn.flushdb()
    from webhook import schema

    engine = make_engine(settings)
    ctx = WorkerContext(settings=settings, engine=engine, redis=rconn)
    install(ctx)
    try:
        schema.upgrade(engine)
        data = fill(engine, fake, account, n, args.mp_share, status="pending")
        stats: Counter[str] = Counter()

        @event.listens_for(engine, "before_cursor_execute")
        def _count(conn: Any, cursor: Any, statement: str, params: Any, context: Any, executemany: bool) -> None:
            stats[f"sql {statement.split(None, 1)[0].upper()}"] += 1
            stats["sql statements"] += 1

        @event.listens_for(engine, "commit")
        def _commit(conn: Any) -> None:
            stats["commits"] += 1

        def measure(name: str, fn: Any, batches: list[list[int]]) -> dict[str, Any]:
            """Time the first half of the batches plainly (statements counted), cProfile the second half."""
            half = max(1, len(batches) // 2) if len(batches) > 1 else len(batches)
            timed, profiled = batches[:half], batches[half:]
            stats.clear()
            calls0 = sum(fake.stats().values())
            t0, c0 = time.perf_counter(), time.process_time()
            for ids in timed:
                fn(ids)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            rows = sum(len(b) for b in timed)
            per_row = {k: v / rows for k, v in sorted(stats.items())}
            per_job = {k: v / len(timed) for k, v in sorted(stats.items())}
            result: dict[str, Any] = {
                "rows": rows, "jobs": len(timed), "ms_per_row": wall * 1000 / rows, "cpu_ms_per_row": cpu * 1000 / rows,
                "per_row": per_row, "per_job": per_job,
                "weixin_calls_per_row": (sum(fake.stats().values()) - calls0) / rows,
            }  # fmt: skip
            print(f"\n  -- {name}: {rows} rows in {len(timed)} direct calls, {result['ms_per_row']:.3f} ms/row wall, "
                  f"{result['cpu_ms_per_row']:.3f} ms/row CPU of this process (the fake Weixin's included)")  # fmt: skip
            out = io.StringIO()
            if profiled:
                profiler = cProfile.Profile()
                profiler.enable()
                for ids in profiled:
                    fn(ids)
                profiler.disable()
                pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(args.profile_top)
            print("     per row: " + ", ".join(f"{k} {v:.2f}" for k, v in per_row.items())
                  + f", weixin calls {result['weixin_calls_per_row']:.2f}")  # fmt: skip
            print("     per job: " + ", ".join(f"{k} {v:.1f}" for k, v in per_job.items()))
            if profiled:
                print(f"     cProfile of the next {sum(len(b) for b in profiled)} rows (cumulative):")
                print("\n".join("     " + line for line in out.getvalue().splitlines()[:args.profile_top + 12] if line.strip()))
            return result

        # The dispatcher's share: pending -> queued and into RQ (one pass per dispatch batch).
        def dispatch_all_once(_: list[int]) -> None:
            while dispatch_once(ctx):
                pass

        results = {"dispatch": measure("dispatch (claim, mark queued, enqueue_many)", dispatch_all_once, [[0] * (n + data.records)])}
        results["dispatch"]["note"] = "rows = events + records"
        with engine.begin() as c:  # the jobs are run directly below, not by RQ
            for table in (events, mp_records):
                c.execute(sa.update(table).values(status="pending", job_id=None))
        rconn.flushdb()
        with engine.connect() as c:
            ev_ids = [int(i) for i in c.execute(sa.select(events.c.id).order_by(events.c.id)).scalars()]
            mp_ids = [int(i) for i in c.execute(sa.select(mp_records.c.id).order_by(mp_records.c.id)).scalars()]
        chunk = lambda ids: [ids[i : i + args.job_batch] for i in range(0, len(ids), args.job_batch)]  # noqa: E731
        results["process_events"] = measure("process_events", jobs.process_events, chunk(ev_ids))
        if mp_ids:
            results["process_mp_records"] = measure("process_mp_records", jobs.process_mp_records, chunk(mp_ids))
        return results
    finally:
        engine.dispose()
        fake.stop()
        rconn.flushdb()
        rconn.close()
        if pg_schema:
            drop_pg_schema(args.postgres_url, pg_schema)


# ---------------------------------------------------------------- 3. the table


def print_phase(p: Phase) -> None:
    what = f"{p.events} events + {p.records} MP records" if p.events else f"{p.items} jobs"
    line = f"  {what} in {p.wall_s:.2f}s: {p.per_s:,.0f}/s"
    if p.events_per_s is not None:
        line += f" ({p.events_per_s:,.0f} events/s counting events only)"
    if p.worker_cpu_ms is not None:
        line += f"; worker CPU {p.worker_cpu_ms:.2f} ms per item"
    if p.machine_busy is not None:
        line += f"; machine {100 * p.machine_busy:.0f}% busy"
    print(line, flush=True)


def print_summary(simple: Phase | None, fork: Phase | None, runs: list[Phase], args: argparse.Namespace) -> bool:
    print("\n== summary", flush=True)
    print(f"  {'':44} {'items':>14} {'wall s':>8} {'items/s':>9} {'events/s':>9} {'CPU ms/item':>12} {'busy':>5}")
    for p in [x for x in (simple, fork) if x] + runs:
        items = f"{p.events}+{p.records}" if p.events else str(p.items)
        ev = f"{p.events_per_s:,.0f}" if p.events_per_s else "-"
        cpu = f"{p.worker_cpu_ms:.2f}" if p.worker_cpu_ms is not None else "-"
        busy = f"{100 * p.machine_busy:.0f}%" if p.machine_busy is not None else "-"
        print(f"  {p.label:44} {items:>14} {p.wall_s:>8.2f} {p.per_s:>9,.0f} {ev:>9} {cpu:>12} {busy:>5}")
    ok = True
    if simple:
        for p in runs:
            ratio = (p.events_per_s or 0) / simple.per_s
            items_ratio = p.per_s / simple.per_s
            p.extra["ratio_events"] = ratio
            p.extra["ratio_items"] = items_ratio
            verdict = "met" if ratio >= TARGET_RATIO else "MISSED"
            print(f"  {p.label}: events/s / no-op SimpleWorker jobs/s = {ratio:.2f} "
                  f"(events + records: {items_ratio:.2f}); target >= {TARGET_RATIO:g}: {verdict}")  # fmt: skip
    if fork and simple:
        print(f"  forking Worker / SimpleWorker no-op rate: {fork.per_s / simple.per_s:.2f}")
    for p in [x for x in (simple, fork) if x] + runs:
        if p.checks:
            print(f"\n  correctness, {p.label}:")
            for name, good in p.checks.items():
                print(f"    [{'ok' if good else 'FAIL'}] {name}")
                ok = ok and good
    return ok


def environment(args: argparse.Namespace) -> dict[str, Any]:
    import rq
    import sqlalchemy

    return {"python": platform.python_version(), "rq": rq.__version__, "sqlalchemy": sqlalchemy.__version__,
            "cpus": os.cpu_count(), "machine": platform.machine(), "redis": redact(args.redis_url)}  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--events", type=int, default=20000, help="stored user_get_card events (default 20000)")
    p.add_argument("--mp-share", type=float, default=0.25,
                   help="share of the cards that also get a Mini Program receipt (default 0.25)")
    p.add_argument("--workers", type=int, default=2, help="worker processes, for RQ and wxcoupon alike (default 2)")
    p.add_argument("--database", default="sqlite", help="sqlite, postgres, or both comma-separated (default sqlite)")
    p.add_argument("--job-batch", type=int, default=DEFAULT_JOB_BATCH,
                   help=f"WXCOUPON_JOB_BATCH (default wxcoupon's, {DEFAULT_JOB_BATCH})")  # fmt: skip
    p.add_argument("--dispatch-batch", type=int, default=0, help="WXCOUPON_DISPATCH_BATCH (default: wxcoupon's)")
    p.add_argument("--dispatch-interval", type=float, default=0.05, help="WXCOUPON_DISPATCH_INTERVAL (default 0.05)")
    p.add_argument("--synchronous", default="FULL", type=str.upper, choices=["FULL", "NORMAL"],
                   help="WXCOUPON_SQLITE_SYNCHRONOUS for SQLite (default FULL, wxcoupon's default)")
    p.add_argument("--noop-jobs", type=int, default=0, help="no-op jobs for the SimpleWorker baseline (default: --events)")
    p.add_argument("--fork-jobs", type=int, default=1000, help="no-op jobs for the forking Worker (default 1000; 0 skips)")
    p.add_argument("--no-baseline", action="store_true", help="skip the RQ no-op runs (no ratio)")
    p.add_argument("--redis-url", default=DEFAULT_REDIS_URL,
                   help=f"Redis for the run; its database is FLUSHED (default {DEFAULT_REDIS_URL})")
    p.add_argument("--postgres-url", default=DEFAULT_POSTGRES_URL, help="PostgreSQL server (a fresh schema per run)")
    p.add_argument("--timeout", type=float, default=900.0, help="give up a wxcoupon run after this many seconds")
    p.add_argument("--quiet-wait", type=float, default=30.0,
                   help="wait up to this long for idle CPUs before each measured run (default 30; 0: don't)")
    p.add_argument("--profile", action="store_true", help="also run the job functions in-process with cProfile")
    p.add_argument("--profile-only", action="store_true", help="only the --profile part (no worker processes)")
    p.add_argument("--profile-events", type=int, default=5000, help="events for --profile (default 5000)")
    p.add_argument("--profile-top", type=int, default=25, help="cProfile lines to print (default 25)")
    p.add_argument("--tmpdir", default=None, help="where the databases and logs go (default: the system temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the temp folder (databases, worker logs)")
    p.add_argument("--json", type=Path, default=None, help="also write the results as JSON to this file")
    args = p.parse_args(argv)
    for name in ("events", "workers", "job_batch"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.events > MAX_EVENTS or args.noop_jobs > MAX_EVENTS or args.fork_jobs > MAX_EVENTS:
        p.error(f"sizes are bounded to {MAX_EVENTS}")
    if not 0 <= args.mp_share <= 1:
        p.error("--mp-share must be between 0 and 1")
    args.databases = [d.strip() for d in args.database.split(",") if d.strip()]
    if not args.databases or any(d not in ("sqlite", "postgres") for d in args.databases):
        p.error("--database takes sqlite, postgres or sqlite,postgres")
    host = urllib.parse.urlsplit(args.redis_url).hostname
    if host not in ("127.0.0.1", "localhost", "::1"):
        p.error("--redis-url must be on loopback")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--rq-worker"]:  # a baseline worker process (started by run_noop)
        rq_worker_main(*argv[1:5])
        return 0
    args = parse_args(argv)
    import shutil

    root = Path(tempfile.mkdtemp(prefix="wxbench-workers-", dir=args.tmpdir))
    account = Account.generate()
    facts = environment(args)
    print(f"worker benchmark: {json.dumps(facts)}; temp folder {root}", flush=True)
    simple = fork = None
    runs: list[Phase] = []
    profiles: dict[str, Any] = {}
    try:
        if not args.no_baseline and not args.profile_only:
            simple = run_noop("simple", args.noop_jobs or args.events, args, root / "rq-simple")
            if args.fork_jobs:
                fork = run_noop("fork", args.fork_jobs, args, root / "rq-fork")
        for database in args.databases if not args.profile_only else []:
            runs.append(run_wxcoupon(database, args, account, root))
        if args.profile or args.profile_only:
            for database in args.databases:
                profiles[database] = run_profile(database, args, account, root)
        ok = print_summary(simple, fork, runs, args)
        if args.json:
            args.json.write_text(json.dumps({
                "environment": facts, "args": {k: v for k, v in vars(args).items() if k != "json"},
                "baseline_simple": asdict(simple) if simple else None, "baseline_fork": asdict(fork) if fork else None,
                "wxcoupon": [asdict(r) for r in runs], "profile": profiles,
            }, indent=2, default=str))  # fmt: skip
        return 0 if ok else 1
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
