"""Schema migrations (Alembic) run from code: `wxcoupon db upgrade` and tests.

Each migration runs in a transaction of its own (so one may leave it, in an
autocommit block, to build an index concurrently: see migrations/online.py),
and one upgrade or downgrade runs at a time per database schema: a second one
waits for the first, then finds the schema at its revision and does nothing.
On PostgreSQL a migration's statements wait at most `ddl_lock_timeout` for a
table lock: a statement waiting for one makes every INSERT into that table
queue behind it, so it gives up instead, and the migration is tried again.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import math
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

# How long a migration's statement waits for a table lock on PostgreSQL (its
# lock_timeout). ALTER TABLE events waits for ACCESS EXCLUSIVE behind any open
# transaction that touched the table, and every INSERT into it queues behind
# the ALTER meanwhile. Weixin waits 5 s for an answer: like SQLite's busy
# timeout (store.SQLITE_BUSY_SECONDS), this leaves a held-up push time to be
# answered.
DEFAULT_DDL_LOCK_TIMEOUT = 2.0
# PostgreSQL's largest lock_timeout: INT_MAX milliseconds.
MAX_DDL_LOCK_TIMEOUT = 2_147_483.0
# A migration that gave up on its lock is tried again this many times in all,
# after a pause that doubles (the pushes that queued behind it drain, and the
# transaction in the way may end). Each try can hold intake up for the timeout
# once, so the count is small and bounded.
DEFAULT_DDL_LOCK_ATTEMPTS = 3
MAX_DDL_LOCK_ATTEMPTS = 10
DDL_RETRY_PAUSE = 1.0
DDL_RETRY_PAUSE_MAX = 30.0
# SQLSTATE lock_not_available: lock_timeout expired (or a NOWAIT lock was refused).
LOCK_NOT_AVAILABLE = "55P03"

OnWait = Callable[[str], None]


class SchemaLockError(RuntimeError):
    """Another upgrade or downgrade held the schema past the wait allowed."""


class DDLLockTimeoutError(RuntimeError):
    """A migration could not lock a table within the DDL lock timeout, on every attempt allowed."""


def alembic_config(engine: Engine) -> Config:
    """An Alembic config pointing at the packaged migrations and this engine."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", engine.url.render_as_string(hide_password=False).replace("%", "%%"))
    return cfg


def ddl_lock_timeout_setting(seconds: float) -> str:
    """PostgreSQL's lock_timeout for `seconds` (0: give up at once); ValueError outside 0..MAX_DDL_LOCK_TIMEOUT."""
    if math.isnan(seconds) or not 0 <= seconds <= MAX_DDL_LOCK_TIMEOUT:
        raise ValueError(f"the DDL lock timeout must be from 0 to {MAX_DDL_LOCK_TIMEOUT:g} seconds, not {seconds:g}")
    # PostgreSQL's 0 would mean "wait for ever": the shortest wait it knows is 1 ms.
    return f"{max(1, round(seconds * 1000))}ms"


def _check_attempts(attempts: int) -> int:
    if not 1 <= attempts <= MAX_DDL_LOCK_ATTEMPTS:
        raise ValueError(f"the DDL lock attempts must be from 1 to {MAX_DDL_LOCK_ATTEMPTS}, not {attempts}")
    return attempts


def upgrade(engine: Engine, revision: str = "head", *, lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
            ddl_lock_timeout: float = DEFAULT_DDL_LOCK_TIMEOUT, ddl_lock_attempts: int = DEFAULT_DDL_LOCK_ATTEMPTS,
            on_wait: OnWait | None = None) -> None:
    """Create or migrate the schema to `revision` (idempotent; one run at a time).

    `on_wait` is told once, with the holder, when another run makes this one
    wait, and each time a migration that gave up on a table lock is tried again.
    """
    setting, attempts = ddl_lock_timeout_setting(ddl_lock_timeout), _check_attempts(ddl_lock_attempts)
    cfg = alembic_config(engine)
    with _migrating(engine, cfg, lock_timeout, setting, on_wait):
        _with_lock_retries(engine, cfg, lambda: command.upgrade(cfg, revision), ddl_lock_timeout, attempts, on_wait)


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at, or None before the first upgrade."""
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def downgrade(engine: Engine, revision: str, *, lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
              ddl_lock_timeout: float = DEFAULT_DDL_LOCK_TIMEOUT, ddl_lock_attempts: int = DEFAULT_DDL_LOCK_ATTEMPTS,
              on_wait: OnWait | None = None) -> None:
    """Migrate the schema down to `revision` ("base" removes everything)."""
    setting, attempts = ddl_lock_timeout_setting(ddl_lock_timeout), _check_attempts(ddl_lock_attempts)
    cfg = alembic_config(engine)
    with _migrating(engine, cfg, lock_timeout, setting, on_wait):
        _with_lock_retries(engine, cfg, lambda: command.downgrade(cfg, revision), ddl_lock_timeout, attempts, on_wait)


@contextlib.contextmanager
def _migrating(engine: Engine, cfg: Config, lock_timeout: float, ddl_lock_timeout: str,
               on_wait: OnWait | None) -> Iterator[None]:
    """Hold the schema lock and hand env.py a connection outside any transaction (PostgreSQL: with `ddl_lock_timeout`)."""
    # Connect first: a database that cannot be opened fails with the driver's
    # reason before any lock (SQLite: a file beside it) is attempted.
    with engine.connect() as conn, schema_lock(engine, lock_timeout, on_wait):
        if conn.dialect.name == "sqlite":
            # Each migration reads, then writes: take SQLite's write lock at its
            # BEGIN, or a push committed in between fails it with SQLITE_BUSY.
            # It needs no lock timeout of its own: a SQLite writer waiting for
            # the lock polls (busy timeout, store.SQLITE_BUSY_SECONDS) and no
            # one queues behind it, and in WAL mode readers never block it.
            conn = conn.execution_options(**{IMMEDIATE_OPTION: True})
            cfg.attributes["connection"] = conn
            yield
            return
        with _session_lock_timeout(conn, ddl_lock_timeout):
            cfg.attributes["connection"] = conn
            yield


@contextlib.contextmanager
def _session_lock_timeout(conn: Connection, setting: str) -> Iterator[None]:
    """Set lock_timeout on the migrations' PostgreSQL session, and reset it before the connection goes back to the pool."""
    # For the session, not SET LOCAL per transaction: it then bounds the
    # migrations' autocommit blocks as well (one session, isolation changed).
    conn.execute(text("SELECT set_config('lock_timeout', :value, false)"), {"value": setting})
    conn.commit()
    try:
        yield
    finally:
        try:
            if conn.in_transaction():
                conn.rollback()
            conn.execute(text("RESET lock_timeout"))
            conn.commit()
        except DBAPIError:
            conn.invalidate()  # the session is gone, and its setting with it


def _with_lock_retries(engine: Engine, cfg: Config, migrate: Callable[[], None], ddl_lock_timeout: float,
                       attempts: int, on_wait: OnWait | None) -> None:
    """Run `migrate`; when a migration gave up on a table lock, run it again after a pause, `attempts` times in all.

    Each migration is a transaction of its own: a try that gave up leaves the
    ones before it applied, and the next try carries on from there.
    """
    for attempt in range(1, attempts + 1):
        try:
            migrate()
            return
        except DBAPIError as exc:
            if getattr(exc.orig, "sqlstate", None) != LOCK_NOT_AVAILABLE:
                raise
            conn: Connection = cfg.attributes["connection"]
            if conn.in_transaction():
                conn.rollback()
            problem = (f"a migration could not lock its table within {ddl_lock_timeout:g}s and gave up, "
                       f"so as not to hold up the writes queued behind it ({_tables_in_use(engine)})")
            if attempt == attempts:
                tries = f" on all {attempts} tries" if attempts > 1 else ""
                raise DDLLockTimeoutError(
                    f"{problem}{tries}; the schema stays at revision {current_revision(engine) or 'base'}; "
                    "run the upgrade again once that transaction has ended") from exc
            pause = min(DDL_RETRY_PAUSE * 2 ** (attempt - 1), DDL_RETRY_PAUSE_MAX)
            if on_wait is not None:
                on_wait(f"{problem}; trying again in {pause:g}s (try {attempt + 1} of {attempts})")
            time.sleep(pause)


def _tables_in_use(engine: Engine) -> str:
    """The tables of this schema that other transactions hold locks on, oldest transaction first: the likely culprits."""
    with engine.connect() as conn:
        rows = conn.execute(text(
            "SELECT c.relname, a.pid, a.application_name, a.state, a.xact_start FROM pg_locks l "
            "JOIN pg_class c ON c.oid = l.relation JOIN pg_stat_activity a ON a.pid = l.pid "
            "WHERE l.locktype = 'relation' AND l.granted AND l.pid <> pg_backend_pid() AND c.relkind IN ('r', 'p') "
            "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
            "AND c.relnamespace = (SELECT oid FROM pg_namespace WHERE nspname = current_schema()) "
            "GROUP BY c.relname, a.pid, a.application_name, a.state, a.xact_start "
            "ORDER BY a.xact_start NULLS LAST, a.pid, c.relname LIMIT 5")).all()
    if not rows:
        return "no transaction holds its tables now: the one in the way has ended, or is not visible to this user"
    held = []
    for table, pid, application, state, since in rows:
        parts = [f"PostgreSQL backend pid {pid}"]
        if application:
            parts.append(f"application {application!r}")
        if state:
            parts.append(state)
        if since is not None:
            parts.append(f"in a transaction since {since:%Y-%m-%d %H:%M:%S %Z}".rstrip())
        held.append(f"table {table} in use by {', '.join(parts)}")
    return "; ".join(held)


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
