"""`wxcoupon db`: the schema."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import click
from sqlalchemy.exc import OperationalError

from webhook import schema
from webhook.store import make_engine

from .common import Seconds, settings_or_exit


@click.group("db")
def db() -> None:
    """Create or migrate the database schema."""


@contextlib.contextmanager
def _reachable() -> Iterator[None]:
    """A database that cannot be reached or opened: one line naming DATABASE_URL, not a traceback."""
    try:
        yield
    except OperationalError as exc:
        lines = str(exc.orig or exc).strip().splitlines()  # the driver's words: host and port, never the password
        reason = lines[0] if lines else type(exc).__name__
        raise click.ClickException(f"cannot use the database of DATABASE_URL: {reason}") from None


def _ddl_lock_timeout(_ctx: click.Context, _param: click.Parameter, value: float) -> float:
    """The range PostgreSQL accepts for lock_timeout."""
    try:
        schema.ddl_lock_timeout_setting(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    return value


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True, help="Alembic revision to migrate to.")
@click.option("--lock-timeout", type=Seconds(min=0), default=schema.DEFAULT_LOCK_TIMEOUT, show_default=True,
              help="Seconds to wait while another upgrade of the same database runs (0: fail at once).")
@click.option("--ddl-lock-timeout", type=Seconds(min=0), default=schema.DEFAULT_DDL_LOCK_TIMEOUT,
              show_default=True, callback=_ddl_lock_timeout,
              help="PostgreSQL: seconds a migration's statement may wait for a table lock before it gives up, "
                   "since writes to the table queue behind it meanwhile (0: give up at once).")
@click.option("--ddl-lock-attempts", type=click.IntRange(min=1, max=schema.MAX_DDL_LOCK_ATTEMPTS),
              default=schema.DEFAULT_DDL_LOCK_ATTEMPTS, show_default=True,
              help="Tries in all of a migration that gave up on a table lock, after a pause doubling from "
                   f"{schema.DDL_RETRY_PAUSE:g}s.")
def upgrade(revision: str, lock_timeout: float, ddl_lock_timeout: float, ddl_lock_attempts: int) -> None:
    """Create or migrate the schema (safe to run on every deploy, and from several hosts at once)."""
    settings = settings_or_exit()
    engine = make_engine(settings)
    try:
        with _reachable():
            schema.upgrade(engine, revision, lock_timeout=lock_timeout, ddl_lock_timeout=ddl_lock_timeout,
                           ddl_lock_attempts=ddl_lock_attempts,
                           on_wait=lambda message: click.echo(f"{message}...", err=True))
            click.echo(f"database at revision {schema.current_revision(engine)}")
    except (schema.SchemaLockError, schema.DDLLockTimeoutError) as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        engine.dispose()


@db.command("current")
def current() -> None:
    """Print the schema revision the database is at."""
    engine = make_engine(settings_or_exit())
    try:
        with _reachable():
            click.echo(schema.current_revision(engine) or "empty (run `wxcoupon db upgrade`)")
    finally:
        engine.dispose()
