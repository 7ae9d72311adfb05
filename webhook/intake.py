"""Turn an opened, parsed push into one committed event row (the outbox entry).

`EventWriter` is the push path's only writer in a process. Each request hands
it its row and is answered only once that row is committed; requests that
arrive while a transaction is running are committed together in the next one
(group commit: one fsync for the batch instead of one per push): requests
overlap in a process under gevent workers (or gthread's threads). With one
request at a time it is simply one transaction per push. On SQLite the web
processes also take turns through a file lock before BEGIN, instead of
SQLite's busy handler, which sleeps for whole milliseconds at a time.
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from . import metrics
from .envelope import OpenedPush
from .errors import StoreUnavailableError
from .events import Push
from .store import (
    INTAKE_WAITING_MODE, SQLITE_BUSY_SECONDS, EventStatus, PreparedEventInsert, insert_event, intake_waiting_path,
    open_lock_file, sqlite_file, try_flock, utcnow,
)

log = logging.getLogger("wxcoupon.webhook")

# A request waits this long for its row to be taken into a transaction, then
# as long again for that transaction: Weixin waits 5 s for the answer, and a
# 503 before that makes it retry.
WRITE_WAIT_SECONDS = 2.0
# Rows per transaction at most (a process has far fewer request threads).
MAX_BATCH = 64
# The writer's connection goes back to the pool after this long unused, so the
# next push checks it out again through the pool's liveness check and recycling.
IDLE_RECYCLE_SECONDS = 60.0
# File-lock polling: the first sleeps are short (a batch holds the lock for
# well under a millisecond), then back off.
_LOCK_SLEEP_FIRST = 0.0002
_LOCK_SLEEP_MAX = 0.002
_SQLITE_BUSY = 5  # SQLite's result code
# How long a push tries for the waiting flag (held exclusively by a worker only for an instant).
_FLAG_WAIT = 0.0005


def _poll(attempt: Callable[[], bool], deadline: float) -> bool:
    """Call `attempt` until it returns True (True) or `deadline` passes (False), backing off 0.2 to 2 ms."""
    pause = _LOCK_SLEEP_FIRST
    while not attempt():
        if time.monotonic() >= deadline:
            return False
        time.sleep(pause)
        pause = min(pause * 2, _LOCK_SLEEP_MAX)
    return True


def _gevent_patched() -> bool:
    """True in a process whose threading gevent has monkey-patched (gunicorn's gevent workers)."""
    monkey = sys.modules.get("gevent.monkey")
    return bool(monkey is not None and monkey.is_module_patched("threading"))


def event_row(push: Push, opened: OpenedPush) -> dict[str, Any]:
    """The column values for a new event, status pending."""
    now = utcnow()
    return {
        "dedupe_key": push.dedupe_key,
        "msg_type": push.msg_type,
        "event": push.event,
        "to_user": push.to_user,
        "openid": push.openid,
        "card_id": push.card_id,
        "code": push.code,
        "old_code": push.old_code,
        "outer_str": push.outer_str,
        "unionid": push.unionid,
        "create_time": push.create_time,
        "mode": opened.mode,
        "raw_xml": opened.xml.decode("utf-8", errors="replace"),
        "fields": push.fields,
        "status": EventStatus.PENDING.value,
        "attempts": 0,
        "received_at": now,
        "updated_at": now,
    }


def record(engine: Engine, push: Push, opened: OpenedPush) -> int | None:
    """Commit the event through SQLAlchemy; its id, or None when it was already stored (a retry)."""
    with engine.begin() as conn:
        return insert_event(conn, event_row(push, opened))


class WriteLockTimeoutError(Exception):
    """The other web processes held the write lock for too long."""


class WriteLock:
    """The web processes' turn at a SQLite file, held from BEGIN to COMMIT.

    Two locks on files beside the database. An exclusive one orders the web
    processes' writers among themselves: they queue here, woken within a
    fraction of a millisecond, rather than in SQLite's busy handler, which
    sleeps for whole milliseconds at a time. A shared one tells the workers
    that a push is waiting for SQLite's write lock: a worker lets it go first
    (`store.yield_to_intake`), so a push waits behind at most the one worker
    transaction already running, not behind a backlog's stream of them.
    """

    def __init__(self, path: Path, waiting: Path) -> None:
        self.path = path
        self.waiting = waiting
        self._fd: int | None = None
        self._waiting_fd: int | None = None
        self._waiting_opened = False  # tried once: a file that cannot be opened is not tried again per push

    @classmethod
    def beside(cls, database: str) -> WriteLock:
        """The lock of the SQLite file at `database`."""
        return cls(Path(f"{database}-intake.lock"), Path(intake_waiting_path(database)))

    def acquire(self, timeout: float) -> None:
        """Take the lock, waiting at most `timeout` seconds (WriteLockTimeoutError after that)."""
        deadline = time.monotonic() + timeout
        if self._fd is None:
            self._fd = open_lock_file(str(self.path))
        fd = self._fd
        self._flag_waiting()
        try:
            taken = _poll(lambda: try_flock(fd, fcntl.LOCK_EX), deadline)
        except BaseException:
            self._stop_waiting()
            raise
        if not taken:
            self._stop_waiting()
            raise WriteLockTimeoutError()

    def release(self) -> None:
        """Let the next process in."""
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        self._stop_waiting()

    def _flag_waiting(self) -> None:
        """Take the shared lock that tells workers a push waits; never wait long for it.

        A worker holds it exclusively only for the instant it looks
        (yield_to_intake); should one be frozen right then, or the file not
        open for us, this push goes without the priority rather than wait.
        """
        if not self._waiting_opened:
            self._waiting_opened = True
            try:
                self._waiting_fd = open_lock_file(str(self.waiting), INTAKE_WAITING_MODE)
            except OSError as exc:  # the push is still written; the workers just do not know it waits
                log.warning("intake waiting lock unavailable",
                            extra={"path": str(self.waiting), "error": type(exc).__name__})  # fmt: skip
        fd = self._waiting_fd
        if fd is not None:
            _poll(lambda: try_flock(fd, fcntl.LOCK_SH), time.monotonic() + _FLAG_WAIT)

    def _stop_waiting(self) -> None:
        if self._waiting_fd is not None:
            fcntl.flock(self._waiting_fd, fcntl.LOCK_UN)

    def close(self) -> None:
        """Close the lock files."""
        for fd in (self._fd, self._waiting_fd):
            if fd is not None:
                os.close(fd)
        self._fd = self._waiting_fd = None
        self._waiting_opened = False


def sqlite_write_lock(engine: Engine) -> WriteLock | None:
    """The write lock of a file-backed SQLite database; None for other databases."""
    path = sqlite_file(engine)
    return None if path is None else WriteLock.beside(path)


def _sqlite_busy(exc: BaseException) -> bool:
    """True for SQLite's 'database is locked' (SQLITE_BUSY and its extended codes)."""
    code = getattr(exc, "sqlite_errorcode", None)
    return code is not None and code & 0xFF == _SQLITE_BUSY


class _Slot:
    """One request's row and, once its transaction ended, the outcome."""

    __slots__ = ("row", "done", "lead", "event_id", "error")

    def __init__(self, row: dict[str, Any]) -> None:
        self.row = row
        # Only a request that waits for another's transaction needs an Event:
        # the one that leads (every push, under sync workers) goes without.
        self.done: threading.Event | None = None
        self.lead = False  # set when this request is to run the next transaction
        self.event_id: int | None = None
        self.error: StoreUnavailableError | None = None

    def wake(self) -> None:
        """Let the request go on, if it is waiting (a follower's)."""
        if self.done is not None:
            self.done.set()

    def outcome(self) -> int | None:
        """The id, None for a duplicate, or the error that kept the row out."""
        if self.error is not None:
            raise self.error
        return self.event_id


class EventWriter:
    """Commits the push path's event rows, in shared transactions when requests overlap.

    There is no writer thread: the first request to find no transaction
    running becomes the leader, commits every row waiting (its own included),
    wakes their requests, and hands the lead to the first request that
    arrived meanwhile. A request is answered only after its own row's COMMIT
    returned; if a transaction fails, every request in it gets 503 (a row
    that is bad on its own is first retried alone, so it cannot sink others).
    """

    def __init__(self, engine: Engine, lock: WriteLock | None = None, wait: float = WRITE_WAIT_SECONDS) -> None:
        self.engine = engine
        self.lock = lock
        self.wait = wait
        self.prepared = PreparedEventInsert(engine.dialect)
        self._sqlite = engine.dialect.name == "sqlite"
        # PostgreSQL: the writer's connection is in autocommit, so a push alone is
        # one round trip (its INSERT commits by itself) instead of three (BEGIN,
        # INSERT, COMMIT); several rows still share one explicit transaction.
        self._autocommit = engine.dialect.name == "postgresql"
        self._dbapi_error: type[Exception] = engine.dialect.loaded_dbapi.Error
        self._mutex = threading.Lock()
        self._waiting: list[_Slot] = []
        self._leading = False
        self._conn: Any = None  # the pool connection only the leader uses
        self._cursor: Any = None  # and its cursor
        self._used_at = 0.0
        self._cooperative = _gevent_patched()

    def write(self, row: dict[str, Any]) -> int | None:
        """Commit one event row; its id, or None when the dedupe key was stored already.

        Raises StoreUnavailableError when the row cannot be committed in time.
        """
        slot = _Slot(row)
        with self._mutex:
            lead = not self._leading
            if not lead:
                slot.done = done = threading.Event()
            self._waiting.append(slot)
            self._leading = True
        if not lead:
            self._wait(slot, done)
            if not slot.lead:
                return slot.outcome()
        elif self._cooperative:
            # Under gevent the other requests of this process run only when this
            # one yields: let those ready get their rows into this transaction.
            time.sleep(0)
        try:
            self._commit_waiting()
        finally:
            self._hand_over()
        return slot.outcome()

    def _wait(self, slot: _Slot, done: threading.Event) -> None:
        if done.wait(self.wait):
            return
        with self._mutex:
            if slot.lead:
                return
            if slot in self._waiting:  # never taken into a transaction: nothing written
                self._waiting.remove(slot)
                slot.error = StoreUnavailableError()
                return
        # Its transaction is running: see it through, within bounds.
        if not done.wait(self.wait):
            slot.error = StoreUnavailableError()

    def _hand_over(self) -> None:
        with self._mutex:
            if self._waiting:
                follower = self._waiting[0]
                follower.lead = True
                follower.wake()
            else:
                self._leading = False

    def _commit_waiting(self) -> None:
        with self._mutex:
            batch = self._waiting[:MAX_BATCH]
            del self._waiting[:MAX_BATCH]
        try:
            ids = self._commit([slot.row for slot in batch])
        except _RowError as exc:
            if len(batch) == 1:
                self._fail(batch, exc.cause)
            else:
                for slot in batch:  # one bad row must not refuse the others
                    self._commit_one(slot)
        except _StoreError as exc:
            self._fail(batch, exc.cause)
        except Exception as exc:  # a defect here must still answer every waiting request
            log.exception("event insert failed")
            self._fail(batch, exc)
        else:
            metrics.observe_intake_batch(len(batch))
            for slot, event_id in zip(batch, ids):
                slot.event_id = event_id
        finally:
            for slot in batch:
                slot.wake()

    def _commit_one(self, slot: _Slot) -> None:
        try:
            [slot.event_id] = self._commit([slot.row])
        except _StoreError as exc:
            self._fail([slot], exc.cause)
        except Exception as exc:
            log.exception("event insert failed")
            self._fail([slot], exc)

    def _fail(self, batch: list[_Slot], cause: BaseException) -> None:
        log.error("store unavailable", extra={"error": type(cause).__name__, "rows": len(batch)})
        error = StoreUnavailableError()
        for slot in batch:
            slot.error = error

    def _commit(self, rows: list[dict[str, Any]]) -> list[int | None]:
        """One transaction for `rows`; retried once on a fresh connection if the old one was dead."""
        for attempt in (1, 2):
            conn = self._connection()
            try:
                return self._transaction(conn, rows)
            except self._dbapi_error as exc:
                dead = self.engine.dialect.is_disconnect(exc, conn.dbapi_connection, None)  # type: ignore[arg-type]
                self._drop_connection(invalidate=dead)
                if dead and attempt == 1:
                    # Safe to repeat: ON CONFLICT DO NOTHING makes a row committed
                    # just before the connection died a duplicate, not a second row.
                    continue
                if isinstance(exc, self.engine.dialect.loaded_dbapi.OperationalError) or len(rows) == 1:
                    raise _StoreError(exc) from None
                raise _RowError(exc) from None
        raise AssertionError("unreachable")

    def _transaction(self, conn: Any, rows: list[dict[str, Any]]) -> list[int | None]:
        deadline = time.monotonic() + self.wait
        if self.lock is not None:
            try:
                self.lock.acquire(self.wait)
            except WriteLockTimeoutError as exc:
                raise _StoreError(exc) from None
        try:
            cursor = self._cursor
            if self._sqlite:
                self._begin_immediate(cursor, deadline)
            elif self._autocommit and len(rows) > 1:
                cursor.execute("BEGIN")
            ids = [self.prepared.execute(cursor, row) for row in rows]
            conn.commit()  # in autocommit, a lone INSERT is committed already: no round trip
            return ids
        except BaseException:
            with contextlib.suppress(Exception):
                conn.rollback()
            raise
        finally:
            if self.lock is not None:
                self.lock.release()

    def _begin_immediate(self, cursor: Any, deadline: float) -> None:
        """BEGIN IMMEDIATE, retried after short pauses while another writer (a worker) holds SQLite's lock.

        The connection's busy handler is off (see `_connection`): it would sleep
        in steps growing to 100 ms and miss the moment the lock is free.
        """

        def begin() -> bool:
            try:
                cursor.execute("BEGIN IMMEDIATE")
            except self._dbapi_error as exc:
                if not _sqlite_busy(exc):
                    raise
                return False
            return True

        if not _poll(begin, deadline):
            raise _StoreError(WriteLockTimeoutError())

    def _connection(self) -> Any:
        now = time.monotonic()
        if self._conn is not None and now - self._used_at > IDLE_RECYCLE_SECONDS:
            self._drop_connection()
        if self._conn is None:
            try:
                conn = self.engine.raw_connection()
            except (SQLAlchemyError, self._dbapi_error) as exc:
                raise _StoreError(exc) from None
            if self._autocommit:
                try:
                    conn.rollback()  # the pool's liveness check may have left a transaction open
                    conn.dbapi_connection.autocommit = True  # type: ignore[union-attr]
                except self._dbapi_error as exc:
                    with contextlib.suppress(Exception):
                        conn.invalidate()
                    raise _StoreError(exc) from None
            elif self._sqlite:
                try:
                    # Busy: retried by _begin_immediate with short pauses, not slept on.
                    conn.dbapi_connection.execute("PRAGMA busy_timeout=0")  # type: ignore[union-attr]
                except self._dbapi_error as exc:
                    with contextlib.suppress(Exception):
                        conn.invalidate()
                    raise _StoreError(exc) from None
            self._conn = conn
            self._cursor = conn.cursor()  # one for the connection's life: reading each INSERT to the end leaves it idle
        self._used_at = now
        return self._conn

    def _drop_connection(self, invalidate: bool = False) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        cursor, self._cursor = self._cursor, None
        with contextlib.suppress(Exception):
            cursor.close()
        with contextlib.suppress(Exception):
            if not invalidate and self._autocommit:
                try:
                    conn.rollback()
                    conn.dbapi_connection.autocommit = False  # as the pool's other users expect it
                except Exception:
                    invalidate = True
            elif not invalidate and self._sqlite:
                try:
                    conn.dbapi_connection.execute(f"PRAGMA busy_timeout={int(SQLITE_BUSY_SECONDS * 1000)}")
                except Exception:
                    invalidate = True
            if invalidate:
                conn.invalidate()
            else:
                conn.close()  # back to the pool

    def close(self) -> None:
        """Return the connection to the pool and close the lock file."""
        with self._mutex:
            self._drop_connection()
            if self.lock is not None:
                self.lock.close()


class _StoreError(Exception):
    """The database could not take the transaction (locked, down, disconnected)."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(type(cause).__name__)
        self.cause = cause


class _RowError(_StoreError):
    """The database refused the transaction for its content: retry the rows one by one."""
