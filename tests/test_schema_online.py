"""Deploy-time safety of the schema: upgrades take turns, indexes build without blocking intake.

Concurrent upgrades run in processes of their own, as on two hosts (Alembic's
`op` and `context` are process-wide, so two upgrades cannot share a process).
Every wait here is for a state the test can see (a lock in pg_locks, a line
of output, a build phase); the deadlines only turn a hang into a failure.
"""
from __future__ import annotations

import multiprocessing
import queue
import secrets
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.operations import Operations
from sqlalchemy import event

import webhook.cardstore  # noqa: F401  (registers its tables)
import webhook.members  # noqa: F401  (likewise)
from webhook import schema
from webhook.migrations.online import IndexConflictError, create_index_online
from webhook.store import events, make_engine, metadata

from . import procs
from .conftest import POSTGRES_URL, _postgres_schema_url, make_settings
from .test_schema import ONLINE_INDEX_REVISION, add_version_location, event_row

HANG = 60.0  # seconds after which a wait that should end counts as a hang (pytest-timeout is 120)


def wait_until(condition: Callable[[], bool], what: str) -> None:
    """Poll `condition` until it holds; fail naming `what` if it never does."""
    deadline = time.monotonic() + HANG
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"never saw: {what}")
        time.sleep(0.05)


def upgrade_in_child(database_url: str, instance: str, versions: str | None, pause_before: str | None,
                     report_wait: bool, paused: Any, release: Any, waiting: Any, results: Any) -> None:
    """Child process: `schema.upgrade`, optionally stopping before a statement until released."""
    if versions:
        add_version_location(pytest.MonkeyPatch(), Path(versions))
    engine = make_engine(make_settings(Path(instance), database_url, None))
    if pause_before:

        @event.listens_for(engine, "before_cursor_execute")
        def hold(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
            if statement.lstrip().startswith(pause_before) and not paused.is_set():
                paused.set()
                release.wait()

    try:
        if report_wait:
            schema.upgrade(engine, on_wait=lambda _message: waiting.set())
        else:
            schema.upgrade(engine)
        results.put(("ok", schema.current_revision(engine)))
    except BaseException as exc:  # reported to the test, which fails on it
        results.put(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        engine.dispose()


class Child:
    """An upgrade in a process of its own, and the events to steer it."""

    def __init__(self, database_url: str, tmp_path: Path, versions: Path | None = None,
                 pause_before: str | None = None, report_wait: bool = False) -> None:
        spawn = multiprocessing.get_context("spawn")
        self.paused, self.release, self.waiting = spawn.Event(), spawn.Event(), spawn.Event()
        self.results = spawn.Queue()
        self.process = spawn.Process(target=upgrade_in_child, args=(
            database_url, str(tmp_path), str(versions) if versions else None, pause_before, report_wait,
            self.paused, self.release, self.waiting, self.results), daemon=True)
        self.process.start()

    def wait_paused(self) -> None:
        """Wait until it stopped before its statement (fail with its outcome if it ended instead)."""
        wait_until(lambda: self.paused.is_set() or not self.process.is_alive(), "the upgrade paused or ended")
        assert self.paused.is_set(), self.result()

    def result(self) -> tuple[str, str | None]:
        """Wait for the upgrade's outcome: ("ok", revision) or ("error", message)."""
        try:
            outcome: tuple[str, str | None] = self.results.get(timeout=HANG)
        except queue.Empty:
            raise AssertionError("the upgrade never finished") from None
        self.process.join(HANG)
        return outcome

    def stop(self) -> None:
        """Let it go on and make sure the process is gone."""
        self.release.set()
        self.process.join(HANG)
        if self.process.is_alive():
            self.process.kill()


def waits_on_a_lock(admin: sa.Engine, application_name: str) -> bool:
    """Whether a backend of this application is waiting for a PostgreSQL lock."""
    with admin.connect() as conn:
        return bool(conn.execute(sa.text(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = :name AND wait_event_type = 'Lock'"),
            {"name": application_name}).scalar())


@pytest.mark.slow
def test_two_upgrades_at_once_take_turns(database_url: str, tmp_path: Path) -> None:
    """A second `wxcoupon db upgrade` during another waits for it, then finds the schema at head: both succeed."""
    application = f"wxc-second-upgrade-{secrets.token_hex(4)}"
    second_url = database_url
    if database_url.startswith("postgresql"):
        second_url = f"{database_url}&application_name={application}"
    first = Child(database_url, tmp_path, pause_before="CREATE TABLE events")
    log = tmp_path / "second-upgrade.log"
    admin = sa.create_engine(database_url)
    second: subprocess.Popen[bytes] | None = None
    try:
        first.wait_paused()
        env = procs.settings_env(make_settings(tmp_path, second_url, None))
        second = procs.start(["db", "upgrade"], env, log)
        started = second

        def second_is_held() -> bool:
            if "waiting for another schema upgrade" in log.read_text() or started.poll() is not None:
                return True
            return database_url.startswith("postgresql") and waits_on_a_lock(admin, application)

        wait_until(second_is_held, "the second upgrade held up by the first")
        first.release.set()
        assert first.result() == ("ok", "0003")
        assert second.wait(HANG) == 0, log.read_text()
    finally:
        first.stop()
        admin.dispose()
        if second is not None and second.poll() is None:
            second.kill()
            second.wait()
    output = log.read_text()
    assert "waiting for another schema upgrade to finish" in output
    assert "database at revision 0003" in output
    engine = sa.create_engine(database_url)
    with engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), metadata) == []
    engine.dispose()


@pytest.mark.slow
def test_an_upgrade_that_cannot_wait_names_the_one_running(database_url: str, tmp_path: Path) -> None:
    """`db upgrade --lock-timeout 0` during another upgrade stops at once, exit 1, saying who holds the schema."""
    first = Child(database_url, tmp_path, pause_before="CREATE TABLE events")
    try:
        first.wait_paused()
        env = procs.settings_env(make_settings(tmp_path, database_url, None))
        second = procs.wxcoupon(["db", "upgrade", "--lock-timeout", "0"], env, timeout=HANG)
        first.release.set()
        assert first.result() == ("ok", "0003")
    finally:
        first.stop()
    assert second.returncode == 1, second.stdout + second.stderr
    assert "another schema upgrade is still running" in second.stderr
    assert f"wxcoupon schema upgrade, pid {first.process.pid} on" in second.stderr
    assert "Traceback" not in second.stderr


@pytest.mark.slow
def test_a_waiting_upgrade_does_not_stall_an_online_index_build(postgres_url: str, tmp_path: Path) -> None:
    """The second upgrade polls for the lock instead of blocking in a statement, whose snapshot
    CREATE INDEX CONCURRENTLY in the first would wait for: a deadlock until the second gave up."""
    versions = tmp_path / "test_versions"
    versions.mkdir()
    (versions / "9001_online_index.py").write_text(ONLINE_INDEX_REVISION)
    application = f"wxc-online-upgrades-{secrets.token_hex(4)}"
    url = f"{postgres_url}&application_name={application}"
    first = Child(url, tmp_path, versions, pause_before="CREATE INDEX CONCURRENTLY")
    second: Child | None = None
    admin = sa.create_engine(postgres_url)
    try:
        first.wait_paused()
        second = Child(url, tmp_path, versions, report_wait=True)
        wait_until(lambda: second.waiting.is_set() or not second.process.is_alive(), "the second upgrade waiting or ended")
        assert second.waiting.is_set(), second.result()
        first.release.set()
        assert first.result() == ("ok", "9001")
        assert second.result() == ("ok", "9001")
    finally:
        # Had they deadlocked, their backends would outlive the processes: end them first.
        with admin.connect() as conn:
            conn.execute(sa.text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = :name"),
                         {"name": application})
        admin.dispose()
        first.stop()
        if second is not None:
            second.stop()


def test_the_upgrade_lock_is_per_schema(postgres_url: str, tmp_path: Path) -> None:
    """Advisory locks are database-wide: the key names the schema, so one schema's upgrade never waits for another's."""
    other_schema = f"wxc_{secrets.token_hex(6)}"
    admin = sa.create_engine(POSTGRES_URL)
    with admin.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{other_schema}"'))
    held, same, other = (sa.create_engine(url) for url in (postgres_url, postgres_url,
                                                            _postgres_schema_url(other_schema)))
    try:
        with schema.schema_lock(held, timeout=0):
            schema.upgrade(other, lock_timeout=0)
            with pytest.raises(schema.SchemaLockError, match="another schema upgrade is still running"):
                schema.upgrade(same, lock_timeout=0)
        schema.upgrade(same, lock_timeout=0)
        assert schema.current_revision(same) == schema.current_revision(other) == "0003"
    finally:
        for engine in (held, same, other):
            engine.dispose()
        with admin.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{other_schema}" CASCADE'))
        admin.dispose()


def run_op(engine: sa.Engine, operation: Callable[[], None]) -> None:
    """Run a migration operation the way a migration script would, outside `db upgrade`."""
    with engine.connect() as conn:
        with Operations.context(MigrationContext.configure(conn)):
            operation()
        if conn.in_transaction():
            conn.commit()


def populated(database_url: str, tmp_path: Path, rows: int = 5000) -> sa.Engine:
    """An engine on a migrated database whose events table holds `rows` rows."""
    engine = make_engine(make_settings(tmp_path, database_url, None))
    schema.upgrade(engine)
    with engine.begin() as conn:
        conn.execute(events.insert(), [event_row(i) for i in range(rows)])
    return engine


def index_valid(engine: sa.Engine, name: str) -> bool | None:
    """pg_index.indisvalid of the index `name`, None if there is none."""
    with engine.connect() as conn:
        return conn.execute(sa.text(
            "SELECT i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
            "WHERE c.relname = :name AND c.relnamespace = current_schema()::regnamespace"), {"name": name}).scalar()


def test_create_index_online_lets_inserts_through_while_it_builds(postgres_url: str, tmp_path: Path) -> None:
    """While the build is in progress (held open by a writer's transaction), another INSERT commits without waiting."""
    engine = populated(postgres_url, tmp_path)
    writer = engine.connect()  # a push in flight: its transaction holds the build in 'waiting for writers'
    writer.begin()
    writer.execute(events.insert(), [event_row(100_001)])
    builder_pid: list[int] = []
    build_error: list[BaseException] = []

    def build() -> None:
        try:
            with engine.connect() as conn:
                builder_pid.append(conn.execute(sa.text("SELECT pg_backend_pid()")).scalar_one())
                conn.commit()
                with Operations.context(MigrationContext.configure(conn)):
                    create_index_online("ix_events_openid", "events", ["openid"])
        except BaseException as exc:  # reported below
            build_error.append(exc)

    def building() -> bool:
        """The builder's CREATE INDEX has started and not ended (in a build phase, or waiting for its lock)."""
        if not builder_pid:
            return False
        with engine.connect() as conn:
            return bool(conn.execute(sa.text(
                "SELECT EXISTS (SELECT FROM pg_stat_progress_create_index WHERE pid = :pid) "
                "OR EXISTS (SELECT FROM pg_stat_activity WHERE pid = :pid AND state = 'active' "
                "AND query ILIKE 'CREATE%INDEX%')"), {"pid": builder_pid[0]}).scalar())

    builder = threading.Thread(target=build)
    builder.start()
    inserter = engine.connect()
    try:
        wait_until(building, "the index build in progress")
        inserter_pid = inserter.execute(sa.text("SELECT pg_backend_pid()")).scalar()
        inserter.commit()
        inserted = threading.Event()

        def insert() -> None:
            with inserter.begin():
                inserter.execute(events.insert(), [event_row(100_002)])
            inserted.set()

        threading.Thread(target=insert, daemon=True).start()

        def insert_done_or_blocked() -> bool:
            if inserted.is_set():
                return True
            with engine.connect() as conn:
                return conn.execute(sa.text("SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = :pid"),
                                    {"pid": inserter_pid}).scalar() is True

        wait_until(insert_done_or_blocked, "the insert committed or waiting for a lock")
        assert inserted.is_set(), "the INSERT waits for the index build"
        assert building(), "the build ended before the insert: nothing was shown"
    finally:
        writer.commit()
        writer.close()
        builder.join(HANG)
        inserter.close()
    assert not build_error, build_error
    assert index_valid(engine, "ix_events_openid") is True
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(events)).scalar() == 5002
    engine.dispose()


def test_create_index_online_rebuilds_an_index_left_invalid(postgres_url: str, tmp_path: Path) -> None:
    """A concurrent build that failed leaves an INVALID index (still enforced, never used): it is dropped and rebuilt."""
    engine = populated(postgres_url, tmp_path, rows=20)
    with engine.begin() as conn:
        conn.execute(events.insert(), [event_row(1000, openid="twice"), event_row(1001, openid="twice")])
    with engine.connect() as conn:
        conn = conn.execution_options(isolation_level="AUTOCOMMIT")
        with pytest.raises(sa.exc.IntegrityError):
            conn.execute(sa.text("CREATE UNIQUE INDEX CONCURRENTLY ix_events_openid ON events (openid)"))
    assert index_valid(engine, "ix_events_openid") is False
    with engine.begin() as conn:
        conn.execute(events.delete().where(events.c.dedupe_key == "test-1001"))
        conn.execute(events.update().where(events.c.openid != "twice").values(openid=events.c.dedupe_key))
    run_op(engine, lambda: create_index_online("ix_events_openid", "events", ["openid"], unique=True))
    assert index_valid(engine, "ix_events_openid") is True
    with pytest.raises(sa.exc.IntegrityError), engine.begin() as conn:
        conn.execute(events.insert(), [event_row(1002, openid="twice")])
    engine.dispose()


def test_create_index_online_keeps_a_built_index_and_refuses_another_tables(postgres_url: str, tmp_path: Path) -> None:
    """Run again, it keeps the valid index (a rerun migration is a no-op); a same-named index elsewhere is an error."""
    engine = populated(postgres_url, tmp_path, rows=20)
    run_op(engine, lambda: create_index_online("ix_events_openid", "events", ["openid"]))
    with engine.connect() as conn:
        oid = conn.execute(sa.text("SELECT 'ix_events_openid'::regclass::oid")).scalar()
    run_op(engine, lambda: create_index_online("ix_events_openid", "events", ["openid"]))
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT 'ix_events_openid'::regclass::oid")).scalar() == oid
    with pytest.raises(IndexConflictError, match="exists on table 'events', not 'cards'"):
        run_op(engine, lambda: create_index_online("ix_events_openid", "cards", ["mp_openid"]))
    engine.dispose()
