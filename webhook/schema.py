"""Schema migrations (Alembic) run from code: `wxcoupon db upgrade` and tests.

Each migration runs in a transaction of its own (so one may leave it, in an
autocommit block, to build an index concurrently: see migrations/online.py),
and one upgrade or downgrade runs at a time per database schema: a second one
waits for the first, then finds the schema at its revision and does nothing.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import DBAPIError

from .store import IMMEDIATE_OPTION

MIGRATIONS = Path(__file__).with_name("migrations")

# How long an upgrade waits for another one to finish. An online index build
# on a large events table can take minutes; past this, it stops and says so.
DEFAULT_LOCK_TIMEOUT = 600.0
# How often a waiting upgrade tries the lock again. It polls rather than block
# in pg_advisory_lock: a backend blocked in a statement keeps a snapshot open,
# and CREATE INDEX CONCURRENTLY in the running upgrade would wait for it.
LOCK_POLL_SECONDS = 0.5

OnWait = Callable[[str], None]


class SchemaLockError(RuntimeError):
    """Another upgrade or downgrade held the schema past the wait allowed."""


def alembic_config(engine: Engine) -> Config:
    """An Alembic config pointing at the packaged migrations and this engine."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", engine.url.render_as_string(hide_password=False).replace("%", "%%"))
    return cfg


def upgrade(engine: Engine, revision: str = "head", *, lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
            on_wait: OnWait | None = None) -> None:
    """Create or migrate the schema to `revision` (idempotent; one run at a time).

    `on_wait` is told once, with the holder, when another run makes this one wait.
    """
    cfg = alembic_config(engine)
    with _migrating(engine, cfg, lock_timeout, on_wait):
        command.upgrade(cfg, revision)


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at, or None before the first upgrade."""
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def downgrade(engine: Engine, revision: str, *, lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
               on_wait: OnWait | None = None) -> None:
    """Migrate the schema down to `revision` ("base" removes everything)."""
    cfg = alembic_config(engine)
    with _migrating(engine, cfg, lock_timeout, on_wait):
        command.downgrade(cfg, revision)


@contextlib.contextmanager
def _migrating(engine: Engine, cfg: Config, lock_timeout: float, on_wait: OnWait | None) -> Iterator[None]:
    """Hold the schema lock and hand env.py a connection outside any transaction."""
    # Connect first: a database that cannot be opened fails with the driver's
    # reason before any lock (SQLite: a file beside it) is attempted.
    with engine.connect() as conn, schema_lock(engine, lock_timeout, on_wait):
        if conn.dialect.name == "sqlite":
            # Each migration reads, then writes: take SQLite's write lock at its
            # BEGIN, or a push committed in between fails it with SQLITE_BUSY.
            conn = conn.execution_options(**{IMMEDIATE_OPTION: True})
        cfg.attributes["connection"] = conn
        yield


@contextlib.contextmanager
def schema_lock(engine: Engine, timeout: float = DEFAULT_LOCK_TIMEOUT, on_wait: OnWait | None = None) -> Iterator[None]:
    """Be the only migration run on this database schema, waiting up to `timeout` seconds for another."""
    if engine.dialect.name == "postgresql":
        with _postgres_lock(engine, timeout, on_wait):
            yield
    elif engine.dialect.name == "sqlite" and (database := _sqlite_file(engine)) is not None:
        with _file_lock(Path(f"{database}.upgrade-lock"), timeout, on_wait):
            yield
    else:  # an in-memory SQLite database belongs to one process
        yield


def _sqlite_file(engine: Engine) -> str | None:
    database = engine.url.database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return database


def _wait_for(try_lock: Callable[[], bool], holder: Callable[[], str], timeout: float, on_wait: OnWait | None) -> None:
    """Call `try_lock` until it succeeds; SchemaLockError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    told = False
    while not try_lock():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            waited = f" after {timeout:g}s of waiting" if timeout > 0 else ""
            raise SchemaLockError(f"another schema upgrade is still running ({holder()}){waited}; "
                                  "run this one again when it has finished")
        if not told and on_wait is not None:
            on_wait(f"waiting for another schema upgrade to finish ({holder()})")
            told = True
        time.sleep(min(LOCK_POLL_SECONDS, remaining))


def _holder_name() -> str:
    return f"wxcoupon schema upgrade, pid {os.getpid()} on {socket.gethostname()}"


def _lock_key(schema_name: str) -> int:
    """A 64-bit advisory lock key for one schema (advisory locks are per database, not per schema)."""
    digest = hashlib.blake2b(f"wxcoupon schema upgrade:{schema_name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


@contextlib.contextmanager
def _postgres_lock(engine: Engine, timeout: float, on_wait: OnWait | None) -> Iterator[None]:
    # A session-level advisory lock on a connection of its own, idle outside any
    # transaction meanwhile: it holds no snapshot that a concurrent index build
    # would wait for, and the lock ends with the session if this process dies.
    with engine.connect() as conn:
        conn = conn.execution_options(isolation_level="AUTOCOMMIT")
        schema_name = conn.execute(text("SELECT current_schema()")).scalar() or ""
        key = _lock_key(schema_name)
        # Named so that a waiting upgrade (and pg_stat_activity) can say which host holds it.
        conn.execute(text("SELECT set_config('application_name', :name, false)"), {"name": _holder_name()[:63]})

        def try_lock() -> bool:
            return bool(conn.execute(text("SELECT pg_try_advisory_lock(:key)"), {"key": key}).scalar())

        _wait_for(try_lock, lambda: _postgres_holder(conn, key), timeout, on_wait)
        try:
            yield
        finally:
            try:
                conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": key})
                conn.execute(text("RESET application_name"))
            except DBAPIError:
                # The session is gone, and its lock with it; the error that
                # ended the session, if any, is the one worth raising.
                conn.invalidate()


def _postgres_holder(conn: Connection, key: int) -> str:
    """Which backend holds the lock: pid, application, client, since when."""
    unsigned = key & 0xFFFFFFFFFFFFFFFF
    row = conn.execute(text(
        "SELECT a.pid, a.application_name, host(a.client_addr), a.backend_start FROM pg_locks l "
        "JOIN pg_stat_activity a ON a.pid = l.pid "
        "WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 "
        "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
        "AND l.classid::bigint = :high AND l.objid::bigint = :low"),
        {"high": unsigned >> 32, "low": unsigned & 0xFFFFFFFF}).first()
    if row is None:
        return "holder unknown: it has just finished, or its session is not visible to this user"
    pid, application, client, since = row
    parts = [f"PostgreSQL backend pid {pid}"]
    if application:
        parts.append(f"application {application!r}")
    parts.append(f"client {client or 'local socket'}")
    if since is not None:
        parts.append(f"connected since {since:%Y-%m-%d %H:%M:%S %Z}".rstrip())
    return ", ".join(parts)


@contextlib.contextmanager
def _file_lock(path: Path, timeout: float, on_wait: OnWait | None) -> Iterator[None]:
    # SQLite's own locks cover one transaction, and an upgrade is several (one
    # per migration): a second upgrade would read the revision between two of
    # them and apply a migration again. flock ends with the process, too.
    with path.open("a+b") as handle:

        def try_lock() -> bool:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            return True

        def holder() -> str:
            handle.seek(0)
            named = handle.read(200).decode(errors="replace").strip()
            return f"{named}, lock file {path}" if named else f"lock file {path}"

        _wait_for(try_lock, holder, timeout, on_wait)
        try:
            handle.truncate(0)
            handle.write(_holder_name().encode())
            handle.flush()
            yield
        finally:
            handle.truncate(0)
            fcntl.flock(handle, fcntl.LOCK_UN)
