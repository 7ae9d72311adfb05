"""`wxcoupon db`: the schema."""
from __future__ import annotations

import click

from webhook import schema
from webhook.store import make_engine

from .common import settings_or_exit


@click.group("db")
def db() -> None:
    """Create or migrate the database schema."""


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True, help="Alembic revision to migrate to.")
def upgrade(revision: str) -> None:
    """Create or migrate the schema (safe to run on every deploy)."""
    settings = settings_or_exit()
    engine = make_engine(settings)
    schema.upgrade(engine, revision)
    click.echo(f"database at revision {schema.current_revision(engine)}")
    engine.dispose()


@db.command("current")
def current() -> None:
    """Print the schema revision the database is at."""
    engine = make_engine(settings_or_exit())
    click.echo(schema.current_revision(engine) or "empty (run `wxcoupon db upgrade`)")
    engine.dispose()
