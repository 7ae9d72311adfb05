"""Alembic environment: runs migrations on the connection wxcoupon hands it.

Every migration runs in a transaction of its own (transaction_per_migration):
a failed one leaves the ones before it applied and itself not at all, and a
migration can leave its transaction for an autocommit block, which
CREATE INDEX CONCURRENTLY needs (see online.py).
"""
from __future__ import annotations

from alembic import context
from sqlalchemy import Connection, create_engine

import webhook.cardstore  # noqa: F401  (registers its tables on the metadata)
import webhook.members  # noqa: F401  (likewise)
from webhook.store import metadata

config = context.config
target_metadata = metadata


def run_migrations_offline() -> None:
    """Emit SQL for the configured URL without connecting."""
    context.configure(url=config.get_main_option("sqlalchemy.url"), target_metadata=target_metadata, literal_binds=True,
                      transaction_per_migration=True)
    with context.begin_transaction():
        context.run_migrations()


def _run_on(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True,
                      transaction_per_migration=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    """Migrate over the caller's connection (webhook.schema: locked, outside any transaction), or one made from the URL."""
    connection = config.attributes.get("connection")
    if connection is not None:
        _run_on(connection)
        return
    engine = create_engine(config.get_main_option("sqlalchemy.url") or "")
    with engine.connect() as conn:
        _run_on(conn)
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
