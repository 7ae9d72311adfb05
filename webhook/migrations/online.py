"""Index changes that do not block writes, for migrations on populated tables.

A plain CREATE INDEX on PostgreSQL holds a SHARE lock on the table for the
whole build: every INSERT waits, and a push Weixin sent meanwhile is answered
503. In a migration, build and drop indexes on tables that hold data with
these instead of op.create_index / op.drop_index:

    from webhook.migrations.online import create_index_online, drop_index_online

    def upgrade() -> None:
        create_index_online("ix_events_openid", "events", ["openid"])

    def downgrade() -> None:
        drop_index_online("ix_events_openid", "events")

On PostgreSQL they commit the migration's transaction so far and run
CONCURRENTLY in autocommit mode, so keep such a migration to its index
changes: whatever came before them is committed even if the build fails. They
are safe to run again: a valid index of that name is kept, one left INVALID by
an interrupted build is dropped and built again. On SQLite (no CONCURRENTLY,
and one writer at a time anyway) they are the plain statements.

They run without the upgrade's lock timeout (`db upgrade --ddl-lock-timeout`).
A CONCURRENTLY build or drop locks the table in SHARE UPDATE EXCLUSIVE mode,
which INSERTs do not conflict with, so waiting for it holds no push up; its
long waits are for older transactions (a push, a worker's batch) to end, and
PostgreSQL counts those as lock waits: under the timeout the build would fail
and leave an INVALID index.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

from alembic import op
from sqlalchemy import Connection, text
from sqlalchemy.exc import DBAPIError


class IndexConflictError(RuntimeError):
    """An index of the requested name exists on another table."""


def create_index_online(index_name: str, table_name: str, columns: Sequence[str], *, unique: bool = False,
                        schema: str | None = None, **kw: Any) -> None:
    """Create an index without blocking writes to the table (CONCURRENTLY on PostgreSQL)."""
    ctx = op.get_context()
    if ctx.dialect.name != "postgresql":
        op.create_index(index_name, table_name, list(columns), unique=unique, schema=schema, **kw)
        return
    with ctx.autocommit_block(), _without_lock_timeout():
        conn = ctx.connection  # the autocommit one, inside the block
        if conn is not None and not ctx.as_sql:
            state = _index_state(conn, index_name, table_name, schema)
            if state == "valid":
                return
            if state == "invalid":
                op.drop_index(index_name, table_name=table_name, schema=schema,
                              postgresql_concurrently=True, if_exists=True)
        op.create_index(index_name, table_name, list(columns), unique=unique, schema=schema,
                        postgresql_concurrently=True, if_not_exists=True, **kw)


def drop_index_online(index_name: str, table_name: str, *, schema: str | None = None) -> None:
    """Drop an index without blocking writes to the table (CONCURRENTLY on PostgreSQL)."""
    ctx = op.get_context()
    if ctx.dialect.name != "postgresql":
        op.drop_index(index_name, table_name=table_name, schema=schema)
        return
    with ctx.autocommit_block(), _without_lock_timeout():
        op.drop_index(index_name, table_name=table_name, schema=schema, postgresql_concurrently=True, if_exists=True)


@contextlib.contextmanager
def _without_lock_timeout() -> Iterator[None]:
    """Inside an autocommit block: lock_timeout off for the session meanwhile, then back to what it was."""
    ctx = op.get_context()
    conn = ctx.connection
    if conn is None or ctx.as_sql:
        yield
        return
    previous = conn.execute(text("SELECT current_setting('lock_timeout')")).scalar_one()
    conn.execute(text("SET lock_timeout = 0"))
    try:
        yield
    finally:
        try:
            conn.execute(text("SELECT set_config('lock_timeout', :value, false)"), {"value": previous})
        except DBAPIError:
            pass  # the session is gone, setting and all; the error that ended it is the one worth raising


def _index_state(conn: Connection, index_name: str, table_name: str, schema: str | None) -> str | None:
    """'valid', 'invalid' (a concurrent build that failed or was interrupted), or None if there is no such index."""
    row = conn.execute(text(
        "SELECT t.relname, i.indisvalid FROM pg_index i "
        "JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_class t ON t.oid = i.indrelid "
        "JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE c.relname = :name AND n.nspname = coalesce(:schema, current_schema())"),
        {"name": index_name, "schema": schema}).first()
    if row is None:
        return None
    if row[0] != table_name:
        raise IndexConflictError(f"index {index_name!r} exists on table {row[0]!r}, not {table_name!r}")
    return "valid" if row[1] else "invalid"
