"""The durable event store: schema, engine, and the statements that move events."""
from __future__ import annotations

import contextlib
import datetime as dt
import enum
import errno
import fcntl
import os
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    DateTime,
    Engine,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    any_,
    bindparam,
    column,
    create_engine,
    event,
    func,
    or_,
    select,
    tuple_,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Dialect
from sqlalchemy.sql.elements import ColumnElement

from .config import Settings

# How long a SQLite writer waits for another's lock. Weixin waits 5 s for the
# answer; failing after 2 s leaves time to answer 503 so that it retries.
SQLITE_BUSY_SECONDS = 2.0
IMMEDIATE_OPTION = "wxcoupon_begin_immediate"

# SQLite wants INTEGER PRIMARY KEY for a rowid alias; PostgreSQL a BIGINT identity.
IdType = BigInteger().with_variant(Integer(), "sqlite")


class EventStatus(str, enum.Enum):
    """Where an event is in its life; the only values the status column holds."""

    PENDING = "pending"  # committed, not yet handed to RQ (the outbox)
    QUEUED = "queued"  # in an RQ job that has not started it
    PROCESSING = "processing"  # a worker is handling it now
    PROCESSED = "processed"  # done; replays change nothing
    FAILED = "failed"  # last attempt failed; will be retried or replayed
    DEAD = "dead"  # retries exhausted; only a replay revives it


metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "pk": "pk_%(table_name)s",
    }
)


def work_columns() -> list[Any]:
    """The work columns and their indexes, for a table the outbox moves.

    The outbox statements below (claim_pending, mark_queued, start_processing,
    ...) work on any table with these columns and an `id` and `updated_at`:
    the events, the Mini Program records and the activation requests share them.
    """
    return [
        Column("status", String(16), nullable=False),
        Column("attempts", Integer, nullable=False, default=0),
        Column("job_id", String(64)),
        Column("last_error", Text),
        Index(None, "status", "id"),
        Index(None, "job_id"),
    ]


# Values that come from Weixin are Text: a length limit here would turn an
# unexpectedly long field into a failed insert, a 5xx and, after three tries, a
# lost event.
events = Table(
    "events",
    metadata,
    Column("id", IdType, primary_key=True, autoincrement=True),
    Column("dedupe_key", String(64), nullable=False, unique=True),
    Column("msg_type", Text, nullable=False),
    Column("event", Text),
    Column("to_user", Text),
    Column("openid", Text),
    Column("card_id", Text),
    Column("code", Text),
    Column("old_code", Text),
    Column("outer_str", Text),
    Column("unionid", Text),
    Column("create_time", BigInteger),
    Column("mode", String(8), nullable=False),
    Column("raw_xml", Text, nullable=False),
    Column("fields", JSON, nullable=False),
    *work_columns(),
    Column("received_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Index(None, "card_id", "code"),
    Index(None, "received_at"),
)


class AttemptOutcome(str, enum.Enum):
    """How one attempt at an event ended."""

    PROCESSED = "processed"
    FAILED = "failed"  # permanent error: waits for a replay
    RETRYING = "retrying"  # transient error: RQ will run it again
    DEAD = "dead"  # transient error on the last retry


# One row per attempt at an event: what `wxcoupon events show` tells.
event_attempts = Table(
    "event_attempts",
    metadata,
    Column("id", IdType, primary_key=True, autoincrement=True),
    Column("event_id", IdType, ForeignKey("events.id", ondelete="CASCADE"), nullable=False),
    Column("attempt", Integer, nullable=False),
    Column("job_id", String(64)),
    Column("worker", Text),
    Column("started_at", DateTime(timezone=True), nullable=False),
    Column("finished_at", DateTime(timezone=True), nullable=False),
    Column("outcome", String(16), nullable=False),
    Column("error", Text),
    Index(None, "event_id"),
)


# The largest id a row can have: BIGINT on PostgreSQL, SQLite's 64-bit INTEGER. A
# larger number given as an id names no row; passed to the database it is an
# error (SQLite: OverflowError; PostgreSQL: out of range), not "not found".
ROW_ID_MAX = 2**63 - 1
# The URL converter of a row id: anything else in its place is a 404, like an id that names no row.
ROW_ID_CONVERTER = f"int(min=1, max={ROW_ID_MAX})"


def utcnow() -> dt.datetime:
    """The current time, timezone-aware UTC (what every timestamp column holds)."""
    return dt.datetime.now(dt.timezone.utc)


def make_engine(settings: Settings) -> Engine:
    """Create the engine for DATABASE_URL; connects lazily, never at import."""
    url = settings.database_url
    if url.startswith("sqlite"):
        if url.startswith("sqlite:///") and ":memory:" not in url:
            settings.instance_path.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_SECONDS}, hide_parameters=True)
        synchronous = settings.sqlite_synchronous

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            # WAL lets the web processes write while workers read; FULL makes an
            # acknowledged push survive a power cut, not only a process crash.
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute(f"PRAGMA synchronous={synchronous}")
            cursor.execute(f"PRAGMA busy_timeout={int(SQLITE_BUSY_SECONDS * 1000)}")
            cursor.close()
            # Let SQLAlchemy, not the driver, emit BEGIN (savepoints need it).
            dbapi_connection.isolation_level = None

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn: Connection) -> None:
            # A transaction that reads and then writes must take the write lock
            # up front: in WAL mode an upgrade after another writer's commit
            # fails at once with SQLITE_BUSY instead of waiting its turn.
            immediate = conn.get_execution_options().get(IMMEDIATE_OPTION, False)
            conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5, hide_parameters=True)


@contextlib.contextmanager
def writing(engine: Engine) -> Iterator[Connection]:
    """A transaction that reads then writes (takes SQLite's write lock at BEGIN)."""
    with engine.connect() as conn:
        conn = conn.execution_options(**{IMMEDIATE_OPTION: True})
        with conn.begin():
            yield conn


def dialect_insert(conn: Connection | Dialect, table: Table) -> Any:
    """The dialect's INSERT into `table`, the one that supports ON CONFLICT DO NOTHING."""
    name = conn.dialect.name if isinstance(conn, Connection) else conn.name
    if name == "postgresql":
        return postgresql.insert(table)
    if name == "sqlite":
        return sqlite.insert(table)
    raise RuntimeError(f"unsupported database dialect {name!r}")


def _insert_for(conn: Connection | Dialect) -> Any:
    return dialect_insert(conn, events)


def insert_once(conn: Connection, table: Table, row: dict[str, Any]) -> int:
    """Insert `row` unless its dedupe_key is stored already; return the row's id either way.

    The unique constraint decides, so concurrent copies of one request make one row.
    """
    stmt = dialect_insert(conn, table).values(**row).on_conflict_do_nothing(index_elements=["dedupe_key"])
    found = conn.execute(stmt.returning(table.c.id)).scalar_one_or_none()
    if found is None:
        found = conn.execute(select(table.c.id).where(table.c.dedupe_key == row["dedupe_key"])).scalar_one()
    return int(found)


# The columns a new event row gives (webhook.intake.event_row); the others
# (id, job_id, last_error) start NULL or are generated.
EVENT_ROW_KEYS = (
    "dedupe_key", "msg_type", "event", "to_user", "openid", "card_id", "code", "old_code", "outer_str", "unionid",
    "create_time", "mode", "raw_xml", "fields", "status", "attempts", "received_at", "updated_at",
)  # fmt: skip


def _event_insert(dialect: Dialect) -> Any:
    """INSERT ... ON CONFLICT (dedupe_key) DO NOTHING RETURNING id, for bound row values."""
    return _insert_for(dialect).on_conflict_do_nothing(index_elements=["dedupe_key"]).returning(events.c.id)


_EVENT_INSERTS: dict[str, Any] = {}


def insert_event(conn: Connection, row: dict[str, Any]) -> int | None:
    """Insert one event row; return its id, or None when the dedupe key exists.

    The unique constraint decides, so two copies of a push arriving at the same
    moment on two processes still make one row.
    """
    # Built once per dialect: building `insert().values(**row)` per call costs
    # more than the insert itself (SQLAlchemy then compiles it from its cache).
    stmt = _EVENT_INSERTS.get(conn.dialect.name)
    if stmt is None:
        stmt = _EVENT_INSERTS[conn.dialect.name] = _event_insert(conn.dialect)
    found = conn.execute(stmt, row).scalar_one_or_none()
    return int(found) if found is not None else None


class PreparedEventInsert:
    """The event INSERT compiled once for a dialect, run on the driver's own cursor.

    The request path inserts one row per push; through SQLAlchemy's execution
    machinery that costs several times the driver call itself. The values are
    converted by the columns' own bind processors for the dialect, so a row is
    stored exactly as `insert_event` would store it.
    """

    def __init__(self, dialect: Dialect) -> None:
        compiled = _event_insert(dialect).compile(dialect=dialect, column_keys=list(EVENT_ROW_KEYS))
        self.sql = str(compiled)
        # qmark/numeric drivers (sqlite3) take a sequence in this order; named ones (psycopg) a dict.
        self.order: tuple[str, ...] | None = tuple(compiled.positiontup) if compiled.positiontup else None
        binds = []
        for column in events.columns:
            if column.name in EVENT_ROW_KEYS:
                process = column.type.dialect_impl(dialect).bind_processor(dialect)
                if process is not None:
                    binds.append((column.name, process))
        self.binds: tuple[tuple[str, Any], ...] = tuple(binds)

    def parameters(self, row: dict[str, Any]) -> Any:
        """The driver parameters for one event row (a dict with every key of EVENT_ROW_KEYS)."""
        values = dict(row)
        for name, process in self.binds:
            values[name] = process(values[name])
        if self.order is None:
            return values
        return [values[name] for name in self.order]

    def execute(self, cursor: Any, row: dict[str, Any]) -> int | None:
        """Insert one row inside the cursor's transaction; its id, or None when the dedupe key exists."""
        cursor.execute(self.sql, self.parameters(row))
        found = cursor.fetchall()  # to the end: sqlite3 leaves a half-read statement open
        return int(found[0][0]) if found else None


# The outbox statements below work on any table with the work columns of
# `events` (id, status, job_id, attempts, last_error, updated_at): the events
# and the Mini Program records move through the same life.


def claim_pending(
    conn: Connection, limit: int, table: Table, apart: ColumnElement[bool]
) -> tuple[list[int], list[int]]:
    """The oldest pending rows (the outbox), at most `limit`, as (ids that may share a job, ids of the
    rows for which `apart` holds)."""
    stmt = (
        select(table.c.id, apart)
        .where(table.c.status == EventStatus.PENDING.value)
        .order_by(table.c.id)
        .limit(limit)
    )
    together: list[int] = []
    alone: list[int] = []
    for row_id, flag in conn.execute(stmt).all():
        (alone if flag else together).append(int(row_id))  # NULL (no last_error, say) is not apart
    return together, alone


def among(conn: Connection, column: Any, values: Iterable[Any]) -> ColumnElement[bool]:
    """`column IN (values)`; on PostgreSQL `column = ANY(:array)`, one parameter whatever the count.

    psycopg turns a statement's placeholders into PostgreSQL's in Python and
    caches that only for statements of at most 50 parameters: the IN list of a
    50-row batch was parsed again on every call (a fifth of a worker's time)
    and the server could never reuse a prepared plan. With an array every
    batch runs the same short statement, which psycopg caches and prepares.
    """
    values = list(values)
    if conn.dialect.name == "postgresql":
        return column == any_(_array(values, column))
    return column.in_(values)


def _array(values: Sequence[Any], like: Any) -> Any:
    """One PostgreSQL array parameter of `values`, typed as arrays of column `like`."""
    return bindparam(None, list(values), type_=postgresql.ARRAY(like.type))


def _unnest(table: Table, rows: Sequence[dict[str, Any]], names: Sequence[str]) -> Any:
    """`rows` as a PostgreSQL derived table: unnest(one array per column of `names`) AS anon(names...)."""
    arrays = [_array([row[n] for row in rows], table.c[n]) for n in names]
    return func.unnest(*arrays).table_valued(*[column(n, table.c[n].type) for n in names]).render_derived()


def pairs_among(conn: Connection, first: Any, second: Any, pairs: Sequence[tuple[Any, Any]]) -> ColumnElement[bool]:
    """`(first, second) IN (pairs)`; on PostgreSQL against two arrays unnested side by side (see `among`)."""
    if conn.dialect.name == "postgresql":
        zipped = select(func.unnest(_array([p[0] for p in pairs], first)), func.unnest(_array([p[1] for p in pairs], second)))
        return tuple_(first, second).in_(zipped)
    return tuple_(first, second).in_(pairs)


def insert_rows(
    conn: Connection, table: Table, rows: Sequence[dict[str, Any]],
    conflict: Sequence[str] | None = None, returning: Sequence[Any] = (),
) -> Any:
    """INSERT `rows` (same keys each), with ON CONFLICT (`conflict`) DO NOTHING and RETURNING if given.

    On PostgreSQL one INSERT … SELECT FROM unnest(one array per column): a
    statement of a few parameters, which psycopg caches and prepares and the
    server runs once, rather than a VALUES list of rows x columns parameters
    parsed anew on every call (see `among`) or one statement per row.
    """
    if conn.dialect.name != "postgresql":
        stmt = dialect_insert(conn, table)
        if conflict is not None:
            stmt = stmt.on_conflict_do_nothing(index_elements=list(conflict))
        return conn.execute(stmt.returning(*returning) if returning else stmt, list(rows))
    names = list(rows[0])
    source = _unnest(table, rows, names)
    stmt = postgresql.insert(table).from_select(names, select(*[source.c[n] for n in names]))
    if conflict is not None:
        stmt = stmt.on_conflict_do_nothing(index_elements=list(conflict))
    return conn.execute(stmt.returning(*returning) if returning else stmt)


def update_rows(conn: Connection, table: Table, rows: Sequence[dict[str, Any]], key: str = "id") -> None:
    """For each row, UPDATE `table` SET its other values WHERE `key` = its key value (keys unique, same columns each).

    On PostgreSQL one UPDATE … FROM unnest(one array per column) (see
    `insert_rows`); elsewhere one executemany.
    """
    if not rows:
        return
    names = [n for n in rows[0] if n != key]
    if conn.dialect.name != "postgresql":
        stmt = update(table).where(table.c[key] == bindparam(f"k_{key}")).values({n: bindparam(f"v_{n}") for n in names})
        conn.execute(stmt, [{f"k_{key}": row[key], **{f"v_{n}": row[n] for n in names}} for row in rows])
        return
    source = _unnest(table, rows, [key, *names])
    conn.execute(update(table).where(table.c[key] == source.c[key]).values({n: source.c[n] for n in names}))


def mark_queued(conn: Connection, ids: Sequence[int], job_id: str, table: Table = events) -> list[int]:
    """Move pending rows to queued under `job_id`; return the ids this call won."""
    if not ids:
        return []
    stmt = (
        update(table)
        .where(among(conn, table.c.id, ids), table.c.status == EventStatus.PENDING.value)
        .values(status=EventStatus.QUEUED.value, job_id=job_id, updated_at=utcnow())
    )
    if conn.dialect.update_returning:
        return sorted(int(i) for i in conn.execute(stmt.returning(table.c.id)).scalars())
    conn.execute(stmt)
    # Job ids are fresh: every row under this one was moved just now (the job_id index finds them).
    return sorted(int(i) for i in conn.execute(select(table.c.id).where(table.c.job_id == job_id)).scalars())


def release_jobs(conn: Connection, job_ids: Iterable[str], table: Table = events) -> int:
    """Put rows of jobs that never reached Redis back to pending."""
    job_ids = list(job_ids)
    if not job_ids:
        return 0
    result = conn.execute(
        update(table)
        .where(table.c.job_id.in_(job_ids), table.c.status == EventStatus.QUEUED.value)
        .values(status=EventStatus.PENDING.value, job_id=None, updated_at=utcnow())
    )
    return int(result.rowcount or 0)


def stale_job_ids(conn: Connection, status: EventStatus, before: dt.datetime, table: Table = events) -> list[str]:
    """Job ids of rows left in `status` since before `before`."""
    stmt = (
        select(table.c.job_id)
        .where(table.c.status == status.value, table.c.updated_at < before, table.c.job_id.is_not(None))
        .distinct()
    )
    return [str(j) for j in conn.execute(stmt).scalars()]


def get_event(conn: Connection, event_id: int) -> dict[str, Any] | None:
    """One event row as a dict, or None."""
    row = conn.execute(select(events).where(events.c.id == event_id)).mappings().first()
    return dict(row) if row is not None else None


def get_events(conn: Connection, ids: Sequence[int]) -> list[dict[str, Any]]:
    """Event rows for these ids, in id order."""
    if not ids:
        return []
    stmt = select(events).where(among(conn, events.c.id, ids)).order_by(events.c.id)
    return [dict(r) for r in conn.execute(stmt).mappings()]


def list_events(
    conn: Connection,
    *,
    event: str | None = None,
    status: str | None = None,
    since: dt.datetime | None = None,
    limit: int | None = None,
) -> list[dict[str, Any]]:
    """Events matching the filters, oldest first; `event` is an Event, or a MsgType for messages."""
    stmt = select(events).order_by(events.c.id)
    if event:
        stmt = stmt.where(or_(events.c.event == event, events.c.msg_type == event))
    if status:
        stmt = stmt.where(events.c.status == status)
    if since is not None:
        stmt = stmt.where(events.c.received_at >= since)
    if limit:
        stmt = stmt.limit(limit)
    return [dict(r) for r in conn.execute(stmt).mappings()]


def count_by_status(conn: Connection) -> dict[str, int]:
    """How many events are in each status."""
    from sqlalchemy import func

    stmt = select(events.c.status, func.count()).group_by(events.c.status)
    return {str(s): int(n) for s, n in conn.execute(stmt).all()}


def _start_statement(conn: Connection, ids: Sequence[int], job_id: str | None, table: Table) -> Any:
    """The UPDATE that moves startable rows among `ids` to processing, one attempt more.

    In a job, only rows queued for that job are startable; without a job, any
    row queued, pending or failed.
    """
    stmt = update(table).where(among(conn, table.c.id, ids))
    if job_id is not None:
        stmt = stmt.where(table.c.status == EventStatus.QUEUED.value, table.c.job_id == job_id)
    else:
        startable = [EventStatus.QUEUED.value, EventStatus.PENDING.value, EventStatus.FAILED.value]
        stmt = stmt.where(table.c.status.in_(startable))
    return stmt.values(
        status=EventStatus.PROCESSING.value, attempts=table.c.attempts + 1, job_id=job_id, updated_at=utcnow()
    )


def start_processing(conn: Connection, ids: Sequence[int], job_id: str | None, table: Table = events) -> list[int]:
    """Mark these rows processing (one attempt more); return the ids that moved.

    In a job, only rows queued for that job move: a job run twice, an RQ retry
    after some rows succeeded, or a stale job after a replay touch nothing
    else. Without a job (a direct call), any row not yet processed moves.
    """
    if not ids:
        return []
    conn.execute(_start_statement(conn, ids, job_id, table))
    moved = select(table.c.id).where(among(conn, table.c.id, ids), table.c.status == EventStatus.PROCESSING.value)
    if job_id is not None:
        moved = moved.where(table.c.job_id == job_id)
    return sorted(int(i) for i in conn.execute(moved).scalars())


def finish_processing(conn: Connection, ids: Sequence[int], table: Table = events, job_id: str | None = None) -> int:
    """Mark rows processed (from processing); return how many moved.

    With `job_id`, only rows that job holds move: a stale run of a job cannot
    finish a row another job took since.
    """
    if not ids:
        return 0
    stmt = update(table).where(among(conn, table.c.id, ids), table.c.status == EventStatus.PROCESSING.value)
    if job_id is not None:
        stmt = stmt.where(table.c.job_id == job_id)
    result = conn.execute(stmt.values(status=EventStatus.PROCESSED.value, last_error=None, updated_at=utcnow()))
    return int(result.rowcount or 0)


def fail_processing(
    conn: Connection, row_id: int, error: str, status: EventStatus, table: Table = events, job_id: str | None = None
) -> bool:
    """Move one processing row to failed, dead, or back to queued for an RQ retry (only `job_id`'s, if given)."""
    stmt = update(table).where(table.c.id == row_id, table.c.status == EventStatus.PROCESSING.value)
    if job_id is not None:
        stmt = stmt.where(table.c.job_id == job_id)
    result = conn.execute(stmt.values(status=status.value, last_error=error[:1000], updated_at=utcnow()))
    return bool(result.rowcount)


def add_attempts(conn: Connection, rows: Sequence[dict[str, Any]]) -> None:
    """Record attempts (event_id, attempt, job_id, worker, started_at, finished_at, outcome, error)."""
    if rows:
        insert_rows(conn, event_attempts, rows)


def start_rows(conn: Connection, ids: Sequence[int], job_id: str | None, table: Table = events) -> list[dict[str, Any]] | None:
    """`start_processing` that returns the rows it moved, in id order, in one statement.

    None when the database cannot return rows from an UPDATE (SQLite before
    3.35): then call `start_processing` and load the rows.
    """
    if not conn.dialect.update_returning:
        return None
    if not ids:
        return []
    stmt = _start_statement(conn, ids, job_id, table).returning(*table.c)
    rows = [dict(r) for r in conn.execute(stmt).mappings()]
    rows.sort(key=lambda r: int(r["id"]))
    return rows


@contextlib.contextmanager
def worker_writing(engine: Engine) -> Iterator[Connection]:
    """`writing` for the workers' transactions: on a SQLite file they first queue on a file lock.

    SQLite's busy handler polls with sleeps that grow to 100 ms, so a waiting
    writer can lose the write lock to busier ones again and again (a job
    waited most of a second behind a dispatcher and another worker). Workers
    of this host queue on a lock file instead, which the kernel hands over the
    moment it is released. Intake does not take it: a worker lets the web
    processes waiting to write go first (`yield_to_intake`), so a push waits
    behind at most one worker transaction. It is a POSIX record lock, which a
    forked child (RQ's scheduler) does not inherit, held by one thread per process.
    """
    path = sqlite_file(engine)
    if path is None:
        with writing(engine) as conn:
            yield conn
        return
    with _thread_lock(path):
        fd = open_lock_file(path + ".workers.lock")
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX)
            yield_to_intake(path)
            with writing(engine) as conn:
                yield conn
        finally:
            os.close(fd)  # releases the lock


# Pushes first: a worker about to take SQLite's write lock lets the web
# processes that are waiting for it go before it, for at most this long. A push
# then waits behind at most the one worker transaction already running, never
# behind a backlog's stream of them (Weixin gives up after 5 s).
INTAKE_PRIORITY_SECONDS = 0.05
# ... and once a push was seen waiting, until none has been for this long.
INTAKE_QUIET_SECONDS = 0.005
_YIELD_SLEEP = 0.0005


# Shared by the web processes and the workers, which may run as two users of one group (as the database must be).
INTAKE_WAITING_MODE = 0o660


def open_lock_file(path: str, mode: int = 0o600) -> int:
    """A descriptor on a lock file beside the database, made if missing (not inherited by child programs)."""
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, mode)


def try_flock(fd: int, operation: int) -> bool:
    """One non-blocking flock (LOCK_EX or LOCK_SH): True if taken, False if another holder has it."""
    try:
        fcntl.flock(fd, operation | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise
        return False
    return True


def intake_waiting_path(path: str) -> str:
    """The file a web process holds a shared lock on while it waits for or holds SQLite's write lock."""
    return path + "-intake.waiting"


def yield_to_intake(
    path: str, limit: float = INTAKE_PRIORITY_SECONDS, quiet: float = INTAKE_QUIET_SECONDS
) -> bool:
    """Wait while web processes are writing the SQLite file at `path` (at most `limit` s).

    Returns at once when no push is waiting. Once one was seen, it returns
    only after `quiet` seconds with none waiting: under a stream of pushes the
    web processes leave gaps of a millisecond or so between them, and a worker
    slipping into each would let through a push or two per worker transaction.
    True when intake went quiet, False when the limit ran out: the caller goes
    ahead anyway, so that a steady stream of pushes cannot starve the workers.
    """
    try:
        fd = open_lock_file(intake_waiting_path(path), INTAKE_WAITING_MODE)
    except OSError:  # e.g. made by a web process of another user without group access: no priority, no failure
        return False
    try:
        now = time.monotonic()
        deadline = now + limit
        quiet_since: float | None = None
        seen = False
        while True:
            # Granted only when no web process holds its shared lock.
            if not try_flock(fd, fcntl.LOCK_EX):
                seen, quiet_since = True, None
            else:
                fcntl.flock(fd, fcntl.LOCK_UN)
                if not seen:
                    return True
                if quiet_since is None:
                    quiet_since = now
                elif now - quiet_since >= quiet:
                    return True
            if now >= deadline:
                return False
            time.sleep(_YIELD_SLEEP)
            now = time.monotonic()
    finally:
        os.close(fd)


_THREAD_LOCKS: dict[str, threading.Lock] = {}
_THREAD_LOCKS_GUARD = threading.Lock()


def _thread_lock(path: str) -> threading.Lock:
    with _THREAD_LOCKS_GUARD:
        return _THREAD_LOCKS.setdefault(path, threading.Lock())


def sqlite_file(engine: Engine) -> str | None:
    """The absolute path of a file-backed SQLite database; None for any other database."""
    if engine.dialect.name != "sqlite":
        return None
    database = engine.url.database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return os.path.abspath(database)


def abandon_processing(
    conn: Connection, ids: Sequence[int], job_id: str | None, error: str, status: EventStatus, table: Table = events
) -> list[tuple[int, int]]:
    """Move rows this job still holds in processing to `status`; return (id, attempts) of those moved.

    For a batch whose write phase could not commit: its rows go back to queued
    for RQ's retry of the job (or dead) at once, instead of waiting for the reaper.
    """
    if not ids:
        return []
    held = (
        among(conn, table.c.id, ids), table.c.status == EventStatus.PROCESSING.value,
        table.c.job_id == job_id if job_id is not None else table.c.job_id.is_(None),
    )  # fmt: skip
    stmt = update(table).where(*held).values(status=status.value, last_error=error[:1000], updated_at=utcnow())
    if conn.dialect.update_returning:
        moved = conn.execute(stmt.returning(table.c.id, table.c.attempts)).all()
    else:
        moved = conn.execute(select(table.c.id, table.c.attempts).where(*held)).all()
        conn.execute(stmt)
    return sorted((int(i), int(a)) for i, a in moved)


def list_attempts(conn: Connection, event_id: int) -> list[dict[str, Any]]:
    """Every attempt at one event, oldest first."""
    stmt = select(event_attempts).where(event_attempts.c.event_id == event_id).order_by(event_attempts.c.id)
    return [dict(r) for r in conn.execute(stmt).mappings()]
