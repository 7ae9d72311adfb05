"""The push path's writer: requests in flight together share a transaction, and each is answered
only after its own row is committed; what fails is refused, never acknowledged."""
from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import sqlalchemy as sa

from webhook import create_app, intake
from webhook.config import Settings
from webhook.envelope import open_push
from webhook.errors import StoreUnavailableError
from webhook.events import parse_push
from webhook.intake import EventWriter, WriteLock, WriteLockTimeoutError, event_row, sqlite_write_lock
from webhook.store import (
    PreparedEventInsert, events, intake_waiting_path, make_engine, open_lock_file, sqlite_file, worker_writing,
    yield_to_intake,
)

from .pushes import make_push

REPO = Path(__file__).resolve().parent.parent


def new_row(settings: Settings, i: int, **overrides: Any) -> dict[str, Any]:
    """The event row of a distinct push."""
    query, body = make_push(settings, UserCardCode=f"{500000000000 + i}", FromUserName=f"oWriter{i:06d}")
    opened = open_push(query, body, settings)
    return {**event_row(parse_push(opened.fields), opened), **overrides}


def stored_keys(engine: sa.Engine) -> dict[str, int]:
    """dedupe_key -> id of every stored event."""
    with engine.connect() as conn:
        return {k: i for k, i in conn.execute(sa.select(events.c.dedupe_key, events.c.id))}


@pytest.fixture
def engine(settings: Settings) -> Iterator[sa.Engine]:
    """An engine on the migrated test database."""
    eng = make_engine(settings)
    yield eng
    eng.dispose()


@pytest.fixture
def writer(engine: sa.Engine) -> Iterator[EventWriter]:
    """The writer as the app makes it (with SQLite's file lock)."""
    w = EventWriter(engine, sqlite_write_lock(engine))
    yield w
    w.close()


def write_all(writer: EventWriter, rows: list[dict[str, Any]], threads: int = 16) -> list[int | None | Exception]:
    """Write rows from many threads at once; each one's id, None (duplicate) or error."""

    def one(row: dict[str, Any]) -> int | None | Exception:
        try:
            return writer.write(row)
        except StoreUnavailableError as exc:
            return exc

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(one, rows))


def test_concurrent_writes_are_all_committed_in_shared_transactions(
    settings: Settings, engine: sa.Engine, writer: EventWriter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """200 rows from 16 threads: every id returned is its own committed row, in fewer transactions than rows."""
    transactions = []
    real = EventWriter._transaction

    def counted(self: EventWriter, conn: Any, rows: list[dict[str, Any]]) -> list[int | None]:
        transactions.append(len(rows))
        time.sleep(0.002)  # a slow disk: the other requests queue meanwhile
        return real(self, conn, rows)

    monkeypatch.setattr(EventWriter, "_transaction", counted)
    rows = [new_row(settings, i) for i in range(200)]
    results = write_all(writer, rows)
    assert all(isinstance(r, int) for r in results)
    assert stored_keys(engine) == {row["dedupe_key"]: r for row, r in zip(rows, results)}
    assert sum(transactions) == 200 and len(transactions) < 200 and max(transactions) > 1


def test_concurrent_copies_of_one_push_make_one_row(settings: Settings, engine: sa.Engine, writer: EventWriter) -> None:
    """32 copies at once, in one batch or several: one id, every other copy a duplicate, one row."""
    row = new_row(settings, 1)
    results = write_all(writer, [dict(row) for _ in range(32)])
    ids = [r for r in results if r is not None]
    assert len(ids) == 1 and results.count(None) == 31
    assert stored_keys(engine) == {row["dedupe_key"]: ids[0]}


def test_prepared_insert_stores_what_sqlalchemy_stores(settings: Settings, engine: sa.Engine, writer: EventWriter) -> None:
    """The driver-level insert gives the same column values as an insert through SQLAlchemy."""
    via_writer, via_sqlalchemy = new_row(settings, 1), new_row(settings, 2)
    writer.write(via_writer)
    with engine.begin() as conn:
        intake.insert_event(conn, via_sqlalchemy)
    with engine.connect() as conn:
        stored = [dict(r) for r in conn.execute(sa.select(events).order_by(events.c.id)).mappings()]
    for sent, got in zip((via_writer, via_sqlalchemy), stored):
        assert {k: got[k] for k in sent} == {**sent, "received_at": got["received_at"], "updated_at": got["updated_at"]}
        assert got["received_at"].replace(tzinfo=None) == sent["received_at"].replace(tzinfo=None)
    assert PreparedEventInsert(engine.dialect).sql.count("ON CONFLICT") == 1


def _hold_first_transaction(monkeypatch: pytest.MonkeyPatch) -> tuple[threading.Event, threading.Event]:
    """Make the next transaction wait inside until released, so that other writes queue into one batch."""
    entered, release = threading.Event(), threading.Event()
    real = EventWriter._transaction

    def held(self: EventWriter, conn: Any, rows: list[dict[str, Any]]) -> list[int | None]:
        if not entered.is_set():
            entered.set()
            assert release.wait(10)
        return real(self, conn, rows)

    monkeypatch.setattr(EventWriter, "_transaction", held)
    return entered, release


def _queued(writer: EventWriter, n: int) -> Callable[[], bool]:
    return lambda: len(writer._waiting) == n


def wait_until(check: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_a_failed_batch_refuses_every_request_in_it_and_stores_none(
    settings: Settings, engine: sa.Engine, writer: EventWriter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Five requests queued behind a running transaction share the next one; its COMMIT fails: all five get
    503 and none of their rows exists; the first request, committed before, is stored and answered."""
    entered, release = _hold_first_transaction(monkeypatch)
    rows = [new_row(settings, i) for i in range(6)]
    with ThreadPoolExecutor(6) as pool:
        first = pool.submit(writer.write, rows[0])
        assert entered.wait(10)
        rest = [pool.submit(writer.write, row) for row in rows[1:]]
        wait_until(_queued(writer, 5))
        # The batch of five fails after its rows were inserted, as a failing COMMIT would.
        real_prepared, dbapi = writer.prepared, engine.dialect.loaded_dbapi
        executed = []

        class FailingFifth:
            def execute(self, cursor: Any, row: dict[str, Any]) -> int | None:
                executed.append(row)
                found = real_prepared.execute(cursor, row)
                if len(executed) == 6:  # the first request's row, then four of the batch
                    raise dbapi.OperationalError("disk I/O error")
                return found

        monkeypatch.setattr(writer, "prepared", FailingFifth())
        release.set()
        first_id = first.result(10)
        errors = [f.exception(10) for f in rest]
    assert isinstance(first_id, int)
    assert all(isinstance(e, StoreUnavailableError) for e in errors)
    assert stored_keys(engine) == {rows[0]["dedupe_key"]: first_id}
    # The writer is not stuck: Weixin's retries are stored.
    monkeypatch.setattr(writer, "prepared", real_prepared)
    assert all(isinstance(r, int) for r in write_all(writer, rows[1:]))
    assert len(stored_keys(engine)) == 6


def test_a_bad_row_does_not_sink_the_rows_batched_with_it(
    settings: Settings, engine: sa.Engine, writer: EventWriter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A row the database refuses on its own (NOT NULL) in a batch of four: it gets 503, the three others
    are stored and acknowledged."""
    entered, release = _hold_first_transaction(monkeypatch)
    rows = [new_row(settings, i) for i in range(4)] + [new_row(settings, 9, mode=None)]
    with ThreadPoolExecutor(5) as pool:
        first = pool.submit(writer.write, rows[0])
        assert entered.wait(10)
        rest = [pool.submit(writer.write, row) for row in rows[1:]]
        wait_until(_queued(writer, 4))
        release.set()
        assert isinstance(first.result(10), int)
        outcomes = [f.exception(10) or f.result() for f in rest]
    assert all(isinstance(o, int) for o in outcomes[:3]) and isinstance(outcomes[3], StoreUnavailableError)
    assert set(stored_keys(engine)) == {row["dedupe_key"] for row in rows[:4]}


def test_sqlite_write_lock_is_bounded_and_gives_503(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """While another web process holds the intake lock past the wait, the push gets 503 and is not stored;
    Weixin's retry after the lock is released is stored."""
    if not settings.database_url.startswith("sqlite"):
        pytest.skip("the file lock is SQLite's")
    app = create_app(settings, {"TESTING": True})
    engine = app.extensions["wxcoupon.engine"]
    other = sqlite_write_lock(engine)  # another open file description: as another process
    assert other is not None
    other.acquire(1)
    try:
        app.extensions["wxcoupon.writer"].wait = 0.2
        query, body = make_push(settings)
        started = time.monotonic()
        resp = app.test_client().post("/wechat", query_string=query, data=body)
        assert resp.status_code == 503 and time.monotonic() - started < 5
        assert stored_keys(engine) == {}
    finally:
        other.release()
        other.close()
    assert app.test_client().post("/wechat", query_string=query, data=body).status_code == 200
    assert len(stored_keys(engine)) == 1
    engine.dispose()


def test_write_lock_times_out_then_can_be_taken(tmp_path: Any) -> None:
    """The lock excludes a second holder for the wait given, then raises; released, it is taken at once."""
    a, b = (WriteLock.beside(str(tmp_path / "db")) for _ in range(2))
    a.acquire(1)
    with pytest.raises(WriteLockTimeoutError):
        b.acquire(0.05)
    a.release()
    b.acquire(0.05)
    b.release()
    a.close()
    b.close()


def test_workers_yield_while_a_push_waits_for_or_holds_the_write_lock(tmp_path: Path) -> None:
    """yield_to_intake waits (bounded) while a web writer holds or waits for the lock, and not otherwise."""
    path = str(tmp_path / "db")
    holder, waiter = WriteLock.beside(path), WriteLock.beside(path)
    assert yield_to_intake(path, limit=0.01)
    holder.acquire(1)
    assert not yield_to_intake(path, limit=0.02)  # a push is being written
    with pytest.raises(WriteLockTimeoutError):
        waiter.acquire(0.02)
    holder.release()
    assert yield_to_intake(path, limit=0.01)  # a writer that gave up no longer counts as waiting
    holder.close()
    waiter.close()


def test_an_unopenable_waiting_file_costs_the_priority_not_the_push(
    settings: Settings, engine: sa.Engine, caplog: pytest.LogCaptureFixture
) -> None:
    """If the shared file cannot be opened (another user's, say), pushes are still stored and workers still write."""
    path = sqlite_file(engine)
    if path is None:
        pytest.skip("the file locks are SQLite's")
    Path(intake_waiting_path(path)).mkdir()  # opening it for writing fails, even as root
    writer = EventWriter(engine, sqlite_write_lock(engine))
    try:
        with caplog.at_level("WARNING", logger="wxcoupon.webhook"):
            ids = [writer.write(new_row(settings, i)) for i in range(2)]
    finally:
        writer.close()
    assert all(isinstance(i, int) for i in ids)
    assert [r.getMessage() for r in caplog.records].count("intake waiting lock unavailable") == 1
    assert yield_to_intake(path) is False
    with worker_writing(engine) as conn:
        conn.execute(sa.update(events).values(attempts=1))
    assert len(stored_keys(engine)) == 2


def test_a_worker_frozen_while_it_looks_does_not_hold_up_pushes(
    settings: Settings, engine: sa.Engine, writer: EventWriter
) -> None:
    """The waiting flag is never waited for: with its file locked exclusively (a worker stopped mid-look), pushes are stored."""
    path = sqlite_file(engine)
    if path is None:
        pytest.skip("the file locks are SQLite's")
    fd = open_lock_file(intake_waiting_path(path))
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        done: list[int | None] = []
        thread = threading.Thread(target=lambda: done.append(writer.write(new_row(settings, 1))), daemon=True)
        thread.start()
        thread.join(10)  # a hang would block here for good
        assert done and isinstance(done[0], int)
    finally:
        os.close(fd)
    assert len(stored_keys(engine)) == 1


# A worker as under a backlog: back-to-back transactions that each hold SQLite's
# write lock for 50 ms (a big job's write phase), queued on the workers' lock.
_BUSY_WORKER = """
import sys, time
from pathlib import Path
from webhook.config import Settings
from webhook.store import make_engine, worker_writing
url, seconds, ready = sys.argv[1], float(sys.argv[2]), Path(sys.argv[3])
engine = make_engine(Settings(token="t", database_url=url, instance_path=ready.parent))
end = time.monotonic() + seconds
while time.monotonic() < end:
    with worker_writing(engine):
        ready.touch()
        time.sleep(0.05)
"""


def test_a_stream_of_worker_transactions_does_not_starve_pushes(
    settings: Settings, writer: EventWriter, engine: sa.Engine, tmp_path: Path
) -> None:
    """Two workers writing without a pause: every push is still committed within its wait, not refused (503).

    Before workers yielded, the pushes' writer met SQLite's lock in its busy
    handler and lost it to the next worker again and again, for seconds.
    """
    if not settings.database_url.startswith("sqlite"):
        pytest.skip("the file locks are SQLite's")
    ready = [tmp_path / f"worker-{i}.ready" for i in range(2)]
    workers = [
        subprocess.Popen([sys.executable, "-c", _BUSY_WORKER, settings.database_url, "8", str(r)], cwd=REPO)
        for r in ready
    ]
    try:
        deadline = time.monotonic() + 30
        while not all(r.exists() for r in ready):
            assert time.monotonic() < deadline and all(w.poll() is None for w in workers), "workers did not start"
            time.sleep(0.01)
        writer.wait = 1.0  # 20 times a worker transaction
        ids = [writer.write(new_row(settings, i)) for i in range(20)]
        assert all(w.poll() is None for w in workers), "the workers stopped before the pushes were written"
    finally:
        for w in workers:
            w.terminate()
            w.wait(10)
    assert all(isinstance(i, int) for i in ids)
    assert len(stored_keys(engine)) == 20


def test_postgres_connection_killed_between_pushes_is_replaced(settings: Settings, engine: sa.Engine,
                                                               writer: EventWriter) -> None:  # fmt: skip
    """The writer's connection terminated by the server: the next push is still stored (one retry)."""
    if engine.dialect.name != "postgresql":
        pytest.skip("a server-side disconnect is PostgreSQL's")
    first = writer.write(new_row(settings, 1))
    pid = writer._conn.dbapi_connection.info.backend_pid
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid}).scalar()
    second = writer.write(new_row(settings, 2))
    assert isinstance(first, int) and isinstance(second, int) and second != first
    assert len(stored_keys(engine)) == 2


def _round_trips(writer: EventWriter, rows: list[dict[str, Any]]) -> tuple[list[int | None], int]:
    """Write `rows` in one transaction through the writer's connection; the ids and the round trips made.

    libpq's trace of the frontend messages: each round trip ends with a Query
    (simple protocol) or a Sync (extended protocol, prepared statements).
    """
    import tempfile

    from psycopg import pq

    pgconn = writer._conn.dbapi_connection.pgconn
    with tempfile.TemporaryFile() as trace:
        pgconn.trace(trace.fileno())
        pgconn.set_trace_flags(pq.Trace.SUPPRESS_TIMESTAMPS | pq.Trace.REGRESS_MODE)
        try:
            ids = writer._commit(rows)
        finally:
            pgconn.untrace()
        trace.seek(0)
        sent = [line.split("\t") for line in trace.read().decode("utf-8", "replace").splitlines()]
    return ids, sum(1 for fields in sent if fields[0] == "F" and len(fields) > 2 and fields[2] in ("Query", "Sync"))


def test_postgres_push_alone_is_one_round_trip_and_the_pool_gets_its_connection_back_unchanged(
    settings: Settings, engine: sa.Engine, writer: EventWriter
) -> None:
    """A lone push is one INSERT that commits by itself (autocommit); rows written together share one
    explicit transaction; the connection goes back to the pool out of autocommit."""
    if engine.dialect.name != "postgresql":
        pytest.skip("round trips to PostgreSQL")
    written = [new_row(settings, i) for i in range(8)]
    for row in written:  # past psycopg's prepare threshold: the steady state
        assert isinstance(writer.write(row), int)
    ids, trips = _round_trips(writer, [new_row(settings, 100)])
    assert trips == 1 and isinstance(ids[0], int)
    # The same row again, not a new push of the same user: CreateTime is the clock's second.
    ids, trips = _round_trips(writer, [new_row(settings, 101), new_row(settings, 102), written[1]])
    assert trips == 5 and isinstance(ids[0], int) and isinstance(ids[1], int) and ids[2] is None  # BEGIN, 3, COMMIT
    assert len(stored_keys(engine)) == 11
    writer.close()
    with engine.connect() as conn:
        assert conn.connection.dbapi_connection.autocommit is False  # type: ignore[union-attr]


@pytest.mark.parametrize("mode", [["--threads", "8"], ["--worker-class", "gevent"]], ids=["gthread", "gevent"])
def test_concurrent_server_commits_every_push_it_acknowledges(settings: Settings, tmp_path: Path, mode: list[str]) -> None:
    """`wxcoupon serve` with requests overlapping in a process (gthread threads or gevent; group commit),
    40 distinct pushes sent 3 times each at once: every answer is success and each push is exactly one row."""
    import requests

    from . import procs

    env = procs.settings_env(settings)
    port = procs.free_port()
    log = tmp_path / "serve.log"
    proc = procs.start(["serve", "--port", str(port), "--workers", "2", *mode], env, log)
    url = f"http://127.0.0.1:{port}/wechat"
    try:
        procs.wait_http(f"http://127.0.0.1:{port}/healthz", proc, log)
        pushes = [make_push(settings, UserCardCode=f"{710000000000 + i}") for i in range(40)]

        def fire(push: tuple[dict[str, str], bytes]) -> tuple[int, str]:
            resp = requests.post(url, params=push[0], data=push[1], timeout=10)
            return resp.status_code, resp.text

        with ThreadPoolExecutor(24) as pool:
            answers = list(pool.map(fire, pushes * 3))
        metrics_text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    finally:
        procs.stop(proc)
    assert answers == [(200, "success")] * 120
    assert f"Using worker: {'gevent' if 'gevent' in mode else 'gthread'}" in log.read_text()
    # Every push went through a transaction (a duplicate too: its insert did nothing), however grouped.
    batched = {line.split()[0]: float(line.split()[1]) for line in metrics_text.splitlines()
               if line.startswith("wxcoupon_intake_batch_rows_")}  # fmt: skip
    assert batched["wxcoupon_intake_batch_rows_sum"] == 120
    assert 1 <= batched["wxcoupon_intake_batch_rows_count"] <= 120
    engine = make_engine(settings)
    with engine.connect() as conn:
        codes = sorted(conn.execute(sa.select(events.c.code)).scalars())
    engine.dispose()
    assert codes == sorted(f"{710000000000 + i}" for i in range(40))


def test_serve_worker_class_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """`serve`'s worker class: sync by default, gthread with threads, gevent on request; bad values are named."""
    import click

    from workers.cli.service import gunicorn_options, web_worker_class

    monkeypatch.delenv("WXCOUPON_WEB_WORKER_CLASS", raising=False)
    assert web_worker_class() == "sync"
    monkeypatch.setenv("WXCOUPON_WEB_WORKER_CLASS", " GEVENT ")
    assert web_worker_class() == "gevent"
    monkeypatch.setenv("WXCOUPON_WEB_WORKER_CLASS", "eventlet")
    with pytest.raises(click.ClickException, match="WXCOUPON_WEB_WORKER_CLASS"):
        web_worker_class()
    assert gunicorn_options("127.0.0.1", 8000, 2, False)["worker_class"] == "sync"
    assert gunicorn_options("127.0.0.1", 8000, 2, False, threads=8)["worker_class"] == "gthread"
    assert gunicorn_options("127.0.0.1", 8000, 2, False, worker_class="gevent")["worker_class"] == "gevent"
    with pytest.raises(click.ClickException, match="gevent workers take no threads"):
        gunicorn_options("127.0.0.1", 8000, 2, False, threads=8, worker_class="gevent")
