"""A migration that cannot lock its table gives up quickly on PostgreSQL instead of stalling intake.

An ALTER TABLE waiting for its ACCESS EXCLUSIVE lock (behind any open
transaction that read the table) makes every later INSERT into the table wait
behind it. With `db upgrade --ddl-lock-timeout` the migration gives up after
that long, the INSERTs go through, and the upgrade can be run again.
"""
from __future__ import annotations

import contextlib
import secrets
import threading
import time
from pathlib import Path

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from webhook import schema
from webhook.store import events, make_engine
from workers.cli import main

from . import procs
from .conftest import make_settings
from .test_schema import ONLINE_INDEX_REVISION, event_row, with_test_revision
from .test_schema_online import HANG, index_valid, wait_until, waits_on_a_lock

# After this long the test stops waiting for the INSERT and ends the blocking
# transaction itself, so that code without the timeout fails instead of hanging.
STUCK = 20.0

# A revision on top of the product's that needs ACCESS EXCLUSIVE on events.
ALTER_EVENTS_REVISION = '''"""test only: a column added to events

Revision ID: 9003
Revises: 0003
"""
import sqlalchemy as sa
from alembic import op

revision = "9003"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("events", sa.Column("note", sa.Text()))


def downgrade() -> None:
    op.drop_column("events", "note")
'''


def open_reader(engine: sa.Engine) -> tuple[sa.Connection, int]:
    """An open transaction that has read events (an operator's psql session): it holds ACCESS SHARE until it ends."""
    conn = engine.connect()
    conn.begin()
    pid = int(conn.execute(sa.text("SELECT pg_backend_pid()")).scalar_one())
    conn.execute(sa.select(sa.func.count()).select_from(events))
    return conn, pid


def event_columns(engine: sa.Engine) -> set[str]:
    """The column names of events."""
    with engine.connect() as conn:
        return {str(column["name"]) for column in sa.inspect(conn).get_columns("events")}


def test_a_migration_that_cannot_lock_its_table_gives_up_and_lets_intake_through(
        postgres_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ALTER TABLE events behind an open transaction gives up after --ddl-lock-timeout: a push's INSERT queued behind
    it commits while that transaction is still open, the upgrade exits 1 with one line naming the table and who holds
    it, the schema stays at the last migration done, and run again once the transaction ended it completes.
    Before, the ALTER waited as long as the transaction lasted, and every INSERT into events with it."""
    with_test_revision(monkeypatch, tmp_path, ALTER_EVENTS_REVISION)
    application = f"wxc-ddl-upgrade-{secrets.token_hex(4)}"
    engine = make_engine(make_settings(tmp_path, postgres_url, None))
    schema.upgrade(engine, "0003")
    admin = sa.create_engine(postgres_url)
    reader, reader_pid = open_reader(engine)
    inserted, settled, released_by_test = threading.Event(), threading.Event(), threading.Event()
    upgrade_returned = threading.Event()
    insert_errors: list[BaseException] = []

    def push_once_the_migration_waits() -> None:
        """A push arriving while the ALTER waits for its lock: its INSERT queues behind the ALTER."""
        try:
            wait_until(lambda: upgrade_returned.is_set() or waits_on_a_lock(admin, application),
                       "the migration waiting for its lock on events, or the upgrade ended")
            with engine.begin() as conn:
                conn.execute(events.insert(), [event_row(1)])
            inserted.set()
        except BaseException as exc:  # reported below
            insert_errors.append(exc)
        finally:
            settled.set()

    def end_the_reader_if_stuck() -> None:
        if not settled.wait(STUCK):
            released_by_test.set()
            with admin.connect() as conn:
                conn.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": reader_pid})

    intake = threading.Thread(target=push_once_the_migration_waits)
    watchdog = threading.Thread(target=end_the_reader_if_stuck, daemon=True)
    intake.start()
    watchdog.start()
    env = procs.settings_env(make_settings(tmp_path, f"{postgres_url}&application_name={application}", None))
    try:
        result = CliRunner().invoke(main, ["db", "upgrade", "--ddl-lock-timeout", "1", "--ddl-lock-attempts", "1"],
                                    env=env)
        upgrade_returned.set()
        intake.join(HANG)
    finally:
        settled.set()
        with contextlib.suppress(sa.exc.DBAPIError):
            reader.rollback()
        reader.close()
        admin.dispose()
    assert not insert_errors, insert_errors
    assert not released_by_test.is_set(), f"the INSERT waited until the test ended the open transaction: {result.output}"
    assert inserted.is_set()
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert "a migration could not lock its table within 1s and gave up" in result.output
    assert f"table events in use by PostgreSQL backend pid {reader_pid}" in result.output
    assert "the schema stays at revision 0003" in result.output
    assert schema.current_revision(engine) == "0003"
    assert "note" not in event_columns(engine)

    again = CliRunner().invoke(main, ["db", "upgrade"], env=env)
    assert again.exit_code == 0, again.output
    assert "database at revision 9003" in again.output
    assert "note" in event_columns(engine)
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(events)).scalar() == 1
    engine.dispose()


def test_a_migration_that_gave_up_is_tried_again_and_completes_once_the_table_is_free(
        postgres_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With attempts left, the upgrade says what is in the way, pauses and tries again: the transaction in the way
    ended meanwhile, so it completes. The lock timeout stays on the upgrade's session: pooled connections are reset."""
    with_test_revision(monkeypatch, tmp_path, ALTER_EVENTS_REVISION)
    monkeypatch.setattr(schema, "DDL_RETRY_PAUSE", 0.05)
    engine = make_engine(make_settings(tmp_path, postgres_url, None))
    schema.upgrade(engine, "0003")
    with engine.connect() as conn:
        server_default = conn.execute(sa.text("SHOW lock_timeout")).scalar()
    reader, reader_pid = open_reader(engine)
    told: list[str] = []

    def on_wait(message: str) -> None:
        told.append(message)
        reader.rollback()  # the operator's session ends during the pause

    try:
        schema.upgrade(engine, ddl_lock_timeout=0.2, ddl_lock_attempts=2, on_wait=on_wait)
    finally:
        reader.close()
    assert schema.current_revision(engine) == "9003"
    assert len(told) == 1, told
    assert f"table events in use by PostgreSQL backend pid {reader_pid}" in told[0]
    assert "trying again in 0.05s (try 2 of 2)" in told[0]
    pooled = [engine.connect() for _ in range(engine.pool.checkedin())]  # type: ignore[attr-defined]
    try:
        assert pooled and all(conn.execute(sa.text("SHOW lock_timeout")).scalar() == server_default for conn in pooled)
    finally:
        for conn in pooled:
            conn.close()
    engine.dispose()


def test_an_online_index_build_still_waits_for_older_writers(
        postgres_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """CREATE INDEX CONCURRENTLY waits for transactions older than it (a push being written), which PostgreSQL counts
    as lock waits: under the DDL lock timeout the build would fail and leave an INVALID index. It holds no INSERT up,
    so the online helpers lift the timeout, and the build waits well past it, then completes."""
    with_test_revision(monkeypatch, tmp_path, ONLINE_INDEX_REVISION)
    application = f"wxc-ddl-online-{secrets.token_hex(4)}"
    migrating = make_engine(make_settings(tmp_path, f"{postgres_url}&application_name={application}", None))
    engine = make_engine(make_settings(tmp_path, postgres_url, None))
    schema.upgrade(engine, "0003")
    writer = engine.connect()
    writer.begin()
    writer.execute(events.insert(), [event_row(1)])
    outcome: list[object] = []

    def upgrade() -> None:
        try:
            schema.upgrade(migrating, ddl_lock_timeout=0.1, ddl_lock_attempts=1)
            outcome.append("ok")
        except BaseException as exc:  # reported below
            outcome.append(exc)

    builder = threading.Thread(target=upgrade)
    builder.start()
    try:
        wait_until(lambda: waits_on_a_lock(engine, application) or not builder.is_alive(), "the build waiting for the writer")
        time.sleep(1.0)  # ten times the DDL lock timeout
        assert builder.is_alive() and waits_on_a_lock(engine, application), outcome
    finally:
        writer.commit()
        writer.close()
        builder.join(HANG)
    assert outcome == ["ok"]
    assert index_valid(engine, "ix_events_openid") is True
    migrating.dispose()
    engine.dispose()


@pytest.mark.parametrize("args", [
    ["--ddl-lock-timeout", "-1"],
    ["--ddl-lock-timeout", "nan"],
    ["--ddl-lock-timeout", "3000000"],
    ["--ddl-lock-attempts", "0"],
    ["--ddl-lock-attempts", "11"],
    ["--lock-timeout", "nan"],  # would have waited for ever for another upgrade: nan compares false
    ["--lock-timeout", "-1"],
])  # fmt: skip
def test_a_bad_ddl_lock_option_is_a_usage_error_naming_it(args: list[str]) -> None:
    """Out of range (PostgreSQL's lock_timeout stops at INT_MAX ms) or not a number: exit 2 naming the option."""
    result = CliRunner().invoke(main, ["db", "upgrade", *args])
    assert result.exit_code == 2, result.output
    assert f"Invalid value for '{args[0]}'" in result.output
